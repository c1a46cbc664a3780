"""CPU speed of the fused NF4 matmul, side by side with the alternatives.

For x [M, K] and a [K, N] kernel, prints median times and ratios of:
- fused: the `KerasQLoRA>NF4Matmul` op (NF4, block 64, double quant);
- f32:   `tf.matmul` with the float32 kernel;
- int4:  a Keras Dense after `quantize("int4")` (block 128);
- pure:  the pure-TF reference path (dequantize, then matmul);
forward only, and forward + input gradient (for the fused op that is the
op with transpose=True on dy; for the others a GradientTape w.r.t. x).
Every path runs inside a `tf.function` (no XLA). Ratios > 1 mean the
fused op is faster. Not a test: it asserts nothing about times.

Run: python benchmarks/matmul_cpu.py [--quick]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_qlora.ops import NF4Tensors  # noqa: E402
from keras_qlora.ops import loader  # noqa: E402
from keras_qlora.ops.reference import nf4_matmul_reference  # noqa: E402
from keras_qlora.quantizers import quantize_nf4  # noqa: E402

FULL_SHAPES = [(4096, 4096), (4096, 11008)]
FULL_ROWS = [1, 4, 16, 32, 128, 512, 2048]
QUICK_SHAPES = [(4096, 4096)]
QUICK_ROWS = [1, 16, 32, 512]


def median_ms(fn, min_reps=5, budget_s=3.0):
    """Median wall time of fn() in ms (after one warm-up call)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (
        time.perf_counter() - start < budget_s and len(times) < 50
    ):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def build_paths(lib, k, n):
    """Returns {name: (forward(x, dy), forward_and_dx(x, dy))}."""
    rng = np.random.default_rng(0)
    kernel = (rng.standard_normal((k, n)) * 0.02).astype("float32")
    state = quantize_nf4(kernel, block_size=64, scale_search=False)
    packed = tf.constant(state.packed)
    absmax = tf.constant(state.absmax)
    scale = tf.constant(state.absmax_scale)
    offset = tf.constant(np.float32(state.absmax_offset))
    weight = NF4Tensors(packed, absmax, scale, state.absmax_offset, (k, n), 64)
    w32 = tf.constant(kernel)
    dense = keras.layers.Dense(n, use_bias=False)
    dense.build((None, k))
    dense.kernel.assign(kernel)
    dense.quantize(
        "int4", config=keras.quantizers.Int4QuantizationConfig(block_size=128)
    )

    def fused(x, transpose=False):
        return lib.keras_q_lo_ra_nf4_matmul(
            x, packed, absmax, scale, offset, k=k, n=n, block_size=64,
            transpose=transpose,
        )

    def pure(x):
        return nf4_matmul_reference(x, weight)

    def with_dx(forward):
        def run(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = forward(x)
            return y, tape.gradient(y, x, output_gradients=dy)

        return run

    paths = {
        "fused": (
            lambda x, dy: fused(x),
            lambda x, dy: (fused(x), fused(dy, transpose=True)),
        ),
        "f32": (
            lambda x, dy: tf.matmul(x, w32),
            lambda x, dy: (
                tf.matmul(x, w32), tf.matmul(dy, w32, transpose_b=True)
            ),
        ),
        "int4": (lambda x, dy: dense(x), with_dx(dense)),
        "pure": (lambda x, dy: pure(x), with_dx(pure)),
    }
    return {
        name: tuple(tf.function(f, jit_compile=False) for f in fns)
        for name, fns in paths.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller run")
    args = parser.parse_args()
    lib = loader.load()
    if lib is None:
        raise SystemExit(f"fused op not available: {loader.status()}")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    rows = QUICK_ROWS if args.quick else FULL_ROWS
    budget = 1.0 if args.quick else 3.0
    names = ["fused", "f32", "int4", "pure"]
    print(f"TF {tf.__version__}, Keras {keras.__version__}, "
          f"{os.cpu_count()} CPUs; times in ms (median); ratio = other/fused")
    header = (f"{'K x N':>11} {'M':>5} {'pass':>7} "
              + " ".join(f"{n:>9}" for n in names)
              + f" {'f32/fused':>10} {'int4/fused':>10} {'pure/fused':>10}")
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(1)
    for k, n in shapes:
        paths = build_paths(lib, k, n)
        for m in rows:
            x = tf.constant(rng.standard_normal((m, k)).astype("float32"))
            dy = tf.constant(rng.standard_normal((m, n)).astype("float32"))
            for mode, label in ((0, "fwd"), (1, "fwd+dx")):
                ms = {
                    name: median_ms(
                        lambda f=paths[name][mode]: f(x, dy), budget_s=budget
                    )
                    for name in names
                }
                print(
                    f"{k:>5}x{n:<5} {m:>5} {label:>7} "
                    + " ".join(f"{ms[name]:>9.2f}" for name in names)
                    + "".join(
                        f" {ms[o] / ms['fused']:>10.2f}"
                        for o in ("f32", "int4", "pure")
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
