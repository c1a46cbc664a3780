"""CPU speed of the fused NF4 matmul at small M, on weights that do not fit
in cache: L layers (default 8) of K x N (default 4096 x 4096) used in
rotation, as a model's forward pass uses them.

Each timed call is one `tf.function` that chains the L layers (the output
of one is the input of the next), so every call reads all L weight
matrices: 69 MB of NF4 (block 64, double quantization) against 537 MB of
float32 for 8 layers of 4096 x 4096, both far larger than a 32 MB L3.
Prints per-layer median milliseconds of the fused op
(`KerasQLoRA>NF4Matmul`) and of `tf.matmul` with the float32 kernels, the
weight bytes per second each reaches, and f32/fused (above 1: the fused op
is faster). `tr` is the op with transpose=True (the input gradient) against
`tf.matmul(..., transpose_b=True)`; it needs K == N. The line
`reduce_sum` is a bandwidth reference: tf.reduce_sum over the float32
kernels. Not a test: it asserts nothing about times.

Run: python benchmarks/gemv_cpu.py [--rows 1,4,16] [--layers 8]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_qlora.ops import loader  # noqa: E402
from keras_qlora.quantizers import quantize_nf4  # noqa: E402


def build_layers(layers, k, n, rng):
    """Returns ([NF4 op inputs per layer], [float32 kernel per layer])."""
    nf4, f32 = [], []
    for _ in range(layers):
        kernel = (rng.standard_normal((k, n)) / np.sqrt(k)).astype("float32")
        state = quantize_nf4(kernel, block_size=64, scale_search=False)
        nf4.append(
            (
                tf.constant(state.packed),
                tf.constant(state.absmax),
                tf.constant(state.absmax_scale),
                tf.constant(np.float32(state.absmax_offset)),
            )
        )
        f32.append(tf.constant(kernel))
    return nf4, f32


def chains(lib, nf4, f32, k, n):
    """Returns {(path, transpose): tf.function(x) over all layers}."""

    def fused(transpose):
        def run(x):
            for packed, absmax, scale, offset in nf4:
                x = lib.keras_q_lo_ra_nf4_matmul(
                    x,
                    packed,
                    absmax,
                    scale,
                    offset,
                    k=k,
                    n=n,
                    block_size=64,
                    transpose=transpose,
                )
            return x

        return tf.function(run, jit_compile=False)

    def dense(transpose):
        def run(x):
            for w in f32:
                x = tf.matmul(x, w, transpose_b=transpose)
            return x

        return tf.function(run, jit_compile=False)

    return {
        (name, tr): make(tr)
        for name, make in (("fused", fused), ("f32", dense))
        for tr in (False, True)
    }


def median_ms(fn, x, reps, layers):
    """Median per-layer milliseconds of fn(x) (after two warm-up calls)."""
    fn(x).numpy()
    fn(x).numpy()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x).numpy()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)) / layers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--rows", default="1,4,16", help="values of M")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternate fused / f32 this often; the best round counts",
    )
    args = parser.parse_args()
    lib = loader.load()
    if lib is None:
        raise SystemExit(f"fused op not available: {loader.status()}")
    k, n, layers = args.k, args.n, args.layers
    rng = np.random.default_rng(0)
    nf4, f32 = build_layers(layers, k, n, rng)
    nf4_bytes = (
        sum(int(np.prod(t.shape)) * t.dtype.size for s in nf4 for t in s[:3])
        / layers
    )
    f32_bytes = 4 * k * n
    fns = chains(lib, nf4, f32, k, n)
    total = f32_bytes * layers
    bw = tf.function(lambda: tf.add_n([tf.reduce_sum(w) for w in f32]))
    bw_s = median_ms(lambda _: bw(), None, args.reps, 1) / 1e3
    print(
        f"{layers} layers of {k}x{n}: NF4 {nf4_bytes * layers / 1e6:.1f} "
        f"MB, float32 {total / 1e6:.1f} MB; {os.cpu_count()} CPUs; "
        f"reduce_sum {total / bw_s / 1e9:.1f} GB/s"
    )
    print(
        f"{'pass':>4} {'M':>3} {'fused ms':>9} {'GB/s':>5} "
        f"{'f32 ms':>8} {'GB/s':>5} {'f32/fused':>9}"
    )
    for transpose in (False, True) if k == n else (False,):
        for m in (int(r) for r in args.rows.split(",")):
            x = tf.constant(rng.standard_normal((m, k)).astype("float32"))
            best = {}
            for _ in range(args.rounds):
                for name in ("fused", "f32"):
                    ms = median_ms(fns[name, transpose], x, args.reps, layers)
                    best[name] = min(best.get(name, ms), ms)
            fu, de = best["fused"], best["f32"]
            print(
                f"{'tr' if transpose else 'fwd':>4} {m:>3} {fu:>9.3f} "
                f"{nf4_bytes / fu / 1e6:>5.1f} {de:>8.3f} "
                f"{f32_bytes / de / 1e6:>5.1f} {de / fu:>9.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
