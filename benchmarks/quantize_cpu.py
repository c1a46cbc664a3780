"""NF4 quantization speed on CPU: numpy reference vs the fused C++ kernels.

Prints, side by side in one run, weights/s of `quantize_nf4` (numpy) and
`quantize_nf4_fused` (C++ kernels, TF intra-op threads) for 4096 x 4096 and
4096 x 11008 kernels (Llama-7B q_proj / up_proj), with scale search on and
off (block 64, double quantization on), the fused / numpy ratio, whether the
two states are bit-identical, and the time a 7B-parameter model would take
at the fused rate. Fused timings are the best of 3 runs after a warm-up; the
numpy ones are a single run (they take seconds).

Run: python benchmarks/quantize_cpu.py [--skip-numpy]
"""

import argparse
import os
import time

import numpy as np
import tensorflow as tf

from keras_qlora.ops import loader
from keras_qlora.ops.quantize import quantize_nf4_fused
from keras_qlora.quantizers import quantize_nf4

SHAPES = [(4096, 4096), (4096, 11008)]


def seconds(fn, repeats, *args, **kwargs):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best, out


def identical(a, b):
    return all(
        np.array_equal(x, y)
        for x, y in [
            (a.packed, b.packed),
            (a.absmax, b.absmax),
            (a.absmax_scale, b.absmax_scale),
            (a.absmax_offset, b.absmax_offset),
        ]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--skip-numpy", action="store_true", help="time the fused path only"
    )
    args = parser.parse_args()
    if loader.load() is None:
        raise SystemExit(
            f"op library not available: {loader.status()['reason']}"
        )
    print(
        f"CPU cores: {os.cpu_count()}, TF intra-op threads: "
        f"{tf.config.threading.get_intra_op_parallelism_threads() or 'auto'}"
        f", KERAS_QLORA_CPU_ISA={os.environ.get('KERAS_QLORA_CPU_ISA', '')}"
    )
    rng = np.random.default_rng(0)
    rates = []
    for shape in SHAPES:
        kernel = rng.standard_normal(shape).astype(np.float32)
        for search in (True, False):
            quantize_nf4_fused(kernel, scale_search=search)  # warm-up
            fused_s, fused = seconds(
                quantize_nf4_fused, 3, kernel, scale_search=search
            )
            line = (
                f"{shape[0]}x{shape[1]:<6} scale_search={search!s:<5} "
                f"fused {kernel.size / fused_s / 1e6:7.1f} M weights/s "
                f"({fused_s * 1e3:6.0f} ms)"
            )
            if search:
                rates.append(kernel.size / fused_s)
            if not args.skip_numpy:
                numpy_s, ref = seconds(
                    quantize_nf4, 1, kernel, scale_search=search
                )
                line += (
                    f"  numpy {kernel.size / numpy_s / 1e6:6.1f} M/s "
                    f"({numpy_s:5.1f} s)  ratio {numpy_s / fused_s:5.1f}x  "
                    f"identical: {identical(fused, ref)}"
                )
            print(line, flush=True)
    rate = min(rates)
    print(
        f"7B parameters with scale search at {rate / 1e6:.0f} M weights/s: "
        f"{7e9 / rate:.0f} s"
    )


if __name__ == "__main__":
    main()
