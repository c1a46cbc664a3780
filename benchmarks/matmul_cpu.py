"""CPU speed of the fused NF4 matmul, side by side with the alternatives.

For x [M, K] and a [K, N] kernel, prints median times and ratios of:
- fused: the `KerasQLoRA>NF4Matmul` op (NF4, block 64, double quant);
- f32:   `tf.matmul` with the float32 kernel;
- int4:  a Keras Dense after `quantize("int4")` (block 128; sweep only);
- pure:  the pure-TF reference path (dequantize, then matmul);
forward only, and forward + input gradient (for the fused op that is the
op with transpose=True on dy; for the others a GradientTape w.r.t. x, or
`tf.matmul(dy, w, transpose_b=True)` for f32). Every path runs inside a
`tf.function` (no XLA). Ratios > 1 mean the fused op is faster. Within a
row the paths are timed in turns (round robin), so the load of a shared
machine hits them alike. Not a test: it asserts nothing about times.

Sections (`--section`, comma-separated; default all):
- sweep:  4096x4096 and 4096x11008 over M = 1 ... 2048 (the original
          table, with Keras int4);
- gemv:   8 distinct 4096x4096 layers applied in a chain (the weight set,
          512 MB in float32 and 67 MB in NF4, is larger than this CPU's
          32 MB L3 cache, as a model's is), M = 1, 4, 16; times per layer;
- shapes: the linear layers of all-MiniLM-L6-v2, GPT-2 medium and Llama-7B
          at M = 1024 and 2048;
- bf16:   the op with bfloat16 x vs tf.matmul in bfloat16, and against
          the float32 fused op on the same shape, M >= 512;
- fit:    seconds per `fit` epoch of the main example, keras_qlora vs
          Keras float32 + `enable_lora` (benchmarks/fit_epoch_cpu.py).

Run: python benchmarks/matmul_cpu.py [--section gemv,shapes] [--quick]
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

SECTIONS = ("sweep", "gemv", "shapes", "bf16", "fit")
SWEEP = {
    "full": ([(4096, 4096), (4096, 11008)], [1, 4, 16, 32, 128, 512, 2048]),
    "quick": ([(4096, 4096)], [1, 16, 32, 512]),
}
GEMV_LAYERS = 8
GEMV_ROWS = [1, 4, 16]
MODEL_SHAPES = {
    "MiniLM": [(384, 384), (384, 1536), (1536, 384)],
    "GPT-2-m": [(1024, 1024), (1024, 4096), (4096, 1024)],
    "Llama-7B": [(4096, 4096), (4096, 11008), (11008, 4096)],
}
QUICK_MODEL_SHAPES = {
    "MiniLM": [(384, 384), (384, 1536), (1536, 384)],
    "GPT-2-m": [(1024, 4096)],
    "Llama-7B": [(4096, 4096)],
}
SHAPE_ROWS = {"full": [1024, 2048], "quick": [1024]}
BF16_SHAPES = {
    "full": [(384, 1536), (1536, 384), (1024, 4096), (4096, 4096)],
    "quick": [(384, 1536), (1024, 4096)],
}
BF16_ROWS = {"full": [512, 1024, 2048], "quick": [512, 2048]}


def interleaved_ms(fns, min_reps=5, budget_s=3.0, max_reps=50):
    """{name: median wall ms} of each `fns[name]()`, timed in turns.

    One warm-up call each; then rounds of one call of each function (the
    order alternating) until every function has `min_reps` times and
    either the budget is spent or `max_reps` is reached.
    """
    names = list(fns)
    for name in names:
        fns[name]()
    times = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_reps or (
        time.perf_counter() - start < budget_s and rounds < max_reps
    ):
        for name in names if rounds % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
        rounds += 1
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


class Layer:
    """One random [K, N] kernel: float32, NF4 op inputs, NF4Tensors."""

    def __init__(self, k, n, seed=0):
        rng = np.random.default_rng(seed)
        kernel = (rng.standard_normal((k, n)) * 0.02).astype("float32")
        state = quantize_nf4(kernel, block_size=64, scale_search=False)
        self.k, self.n = k, n
        self.kernel = kernel
        self.op_inputs = (
            tf.constant(state.packed),
            tf.constant(state.absmax),
            tf.constant(state.absmax_scale),
            tf.constant(np.float32(state.absmax_offset)),
        )
        self.weight = NF4Tensors(
            *self.op_inputs[:3], state.absmax_offset, (k, n), 64
        )
        self.w32 = tf.constant(kernel)
        self._w16 = None

    @property
    def w16(self):
        """The kernel in bfloat16 (made on first use)."""
        if self._w16 is None:
            self._w16 = tf.cast(self.w32, tf.bfloat16)
        return self._w16

    def fused(self, lib, x, transpose=False):
        return lib.keras_q_lo_ra_nf4_matmul(
            x, *self.op_inputs, k=self.k, n=self.n, block_size=64,
            transpose=transpose,
        )

    def int4_dense(self):
        dense = keras.layers.Dense(self.n, use_bias=False)
        dense.build((None, self.k))
        dense.kernel.assign(self.kernel)
        dense.quantize(
            "int4",
            config=keras.quantizers.Int4QuantizationConfig(block_size=128),
        )
        return dense


def with_dx(forward):
    """(x, dy) -> (y, dx) by a GradientTape through `forward(x)`."""

    def run(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward(x)
        return y, tape.gradient(y, x, output_gradients=dy)

    return run


def traced(paths):
    """{name: (fwd, fwd+dx)} -> the same, each in a `tf.function`."""
    return {
        name: tuple(tf.function(f, jit_compile=False) for f in fns)
        for name, fns in paths.items()
    }


def single_layer_paths(lib, layer, int4=False):
    """{name: (forward(x, dy), forward_and_dx(x, dy))} for one layer."""
    paths = {
        "fused": (
            lambda x, dy: layer.fused(lib, x),
            lambda x, dy: (
                layer.fused(lib, x), layer.fused(lib, dy, transpose=True)
            ),
        ),
        "f32": (
            lambda x, dy: tf.matmul(x, layer.w32),
            lambda x, dy: (
                tf.matmul(x, layer.w32),
                tf.matmul(dy, layer.w32, transpose_b=True),
            ),
        ),
        "pure": (
            lambda x, dy: nf4_matmul_reference(x, layer.weight),
            with_dx(lambda x: nf4_matmul_reference(x, layer.weight)),
        ),
    }
    if int4:
        dense = layer.int4_dense()
        paths["int4"] = (lambda x, dy: dense(x), with_dx(dense))
    return traced(paths)


def chain_paths(lib, layers):
    """Paths through `layers` in a chain (each K = N): forward through all,
    and for fwd+dx also the input gradient back through all, as a model's
    forward and backward passes visit its layers."""

    def chain(step):
        def forward(x):
            for layer in layers:
                x = step(layer, x)
            return x

        return forward

    def chain_back(step):
        def run(x, dy):
            y = chain(lambda layer, h: step(layer, h, False))(x)
            for layer in reversed(layers):
                dy = step(layer, dy, True)
            return y, dy

        return run

    def fused(layer, h, transpose=False):
        return layer.fused(lib, h, transpose)

    def f32(layer, h, transpose=False):
        return tf.matmul(h, layer.w32, transpose_b=transpose)

    def pure(layer, h):
        return nf4_matmul_reference(h, layer.weight)

    return traced(
        {
            "fused": (lambda x, dy: chain(fused)(x), chain_back(fused)),
            "f32": (lambda x, dy: chain(f32)(x), chain_back(f32)),
            "pure": (lambda x, dy: chain(pure)(x), with_dx(chain(pure))),
        }
    )


def random_inputs(rng, m, k, n, dtype=tf.float32):
    x = tf.constant(rng.standard_normal((m, k)).astype("float32"))
    dy = tf.constant(rng.standard_normal((m, n)).astype("float32"))
    return tf.cast(x, dtype), tf.cast(dy, dtype)


def print_header(first, names, ratios):
    header = (
        f"{first} {'M':>5} {'pass':>7} "
        + " ".join(f"{n:>9}" for n in names)
        + "".join(f" {r:>11}" for r in ratios)
    )
    print(header)
    print("-" * len(header))


def print_row(first, m, label, ms, names, ratios):
    cells = []
    for ratio in ratios:
        top, bottom = ratio.split("/")
        cells.append(f" {ms[top] / ms[bottom]:>11.2f}")
    print(
        f"{first} {m:>5} {label:>7} "
        + " ".join(f"{ms[name]:>9.2f}" for name in names)
        + "".join(cells),
        flush=True,
    )


def time_rows(paths, inputs, budget, per=1):
    """[(label, {name: ms})] for fwd and fwd+dx; times divided by `per`."""
    x, dy = inputs
    rows = []
    for mode, label in ((0, "fwd"), (1, "fwd+dx")):
        fns = {
            name: (lambda f=fns[mode]: f(x, dy)) for name, fns in paths.items()
        }
        ms = interleaved_ms(fns, budget_s=budget)
        rows.append((label, {name: t / per for name, t in ms.items()}))
    return rows


def section_sweep(lib, size, budget):
    shapes, rows = SWEEP[size]
    names = ["fused", "f32", "int4", "pure"]
    ratios = ["f32/fused", "int4/fused", "pure/fused"]
    print("\n## sweep: one layer, ms per call (median)")
    print_header(f"{'K x N':>11}", names, ratios)
    rng = np.random.default_rng(1)
    for k, n in shapes:
        paths = single_layer_paths(lib, Layer(k, n), int4=True)
        for m in rows:
            for label, ms in time_rows(
                paths, random_inputs(rng, m, k, n), budget
            ):
                print_row(f"{k:>5}x{n:<5}", m, label, ms, names, ratios)


def section_gemv(lib, size, budget):
    k = n = 4096
    layers = [Layer(k, n, seed=i) for i in range(GEMV_LAYERS)]
    nf4_bytes, f32_bytes = k * n * 4.127 / 8, k * n * 4
    print(
        f"\n## gemv: {GEMV_LAYERS} distinct {k}x{n} layers in a chain "
        f"(float32 {GEMV_LAYERS * f32_bytes / 2**20:.0f} MiB, NF4 "
        f"{GEMV_LAYERS * nf4_bytes / 2**20:.0f} MiB); ms per layer (median "
        "whole-chain call / layers); GB/s: weight bytes read per second "
        "(fwd+dx reads each weight twice)"
    )
    names = ["fused", "f32", "pure"]
    ratios = ["f32/fused", "pure/fused"]
    print_header(f"{'K x N':>11}", names, ratios + ["fused GB/s", "f32 GB/s"])
    paths = chain_paths(lib, layers)
    rng = np.random.default_rng(2)
    for m in GEMV_ROWS:
        rows = time_rows(
            paths, random_inputs(rng, m, k, n), budget, per=GEMV_LAYERS
        )
        for label, ms in rows:
            reads = 1 if label == "fwd" else 2
            ms["fused GB"] = 1e3 * reads * nf4_bytes / 1e9
            ms["f32 GB"] = 1e3 * reads * f32_bytes / 1e9
            print_row(
                f"{k:>5}x{n:<5}", m, label, ms, names,
                ratios + ["fused GB/fused", "f32 GB/f32"],
            )


def section_shapes(lib, size, budget):
    shapes = MODEL_SHAPES if size == "full" else QUICK_MODEL_SHAPES
    names = ["fused", "f32", "pure"]
    ratios = ["f32/fused", "pure/fused"]
    print("\n## shapes: model layers at training / prefill M, ms (median)")
    print_header(f"{'model':>8} {'K x N':>11}", names, ratios)
    rng = np.random.default_rng(3)
    for model, pairs in shapes.items():
        for k, n in pairs:
            paths = single_layer_paths(lib, Layer(k, n))
            for m in SHAPE_ROWS[size]:
                for label, ms in time_rows(
                    paths, random_inputs(rng, m, k, n), budget
                ):
                    print_row(
                        f"{model:>8} {k:>5}x{n:<5}", m, label, ms, names,
                        ratios,
                    )


def bf16_paths(lib, layer):
    def fused_fwd(x, dy):
        return layer.fused(lib, x)

    def fused_dx(x, dy):
        return layer.fused(lib, x), layer.fused(lib, dy, transpose=True)

    def mm(w):
        return (
            lambda x, dy: tf.matmul(x, w),
            lambda x, dy: (tf.matmul(x, w), tf.matmul(dy, w, transpose_b=True)),
        )

    return traced(
        {
            "fused16": (fused_fwd, fused_dx),
            "fused32": (fused_fwd, fused_dx),
            "mm16": mm(layer.w16),
            "mm32": mm(layer.w32),
        }
    )


def section_bf16(lib, size, budget):
    names = ["fused16", "fused32", "mm16", "mm32"]
    ratios = ["fused32/fused16", "mm16/fused16", "mm32/fused16"]
    print(
        "\n## bf16: fused16 = the op with bfloat16 x (and dy); fused32 = "
        "the op with float32 x; mm16 / mm32 = tf.matmul in bfloat16 / "
        "float32; ms (median). Target: fused32/fused16 >= 1.3 at M >= 512"
    )
    print_header(f"{'K x N':>11}", names, ratios)
    rng = np.random.default_rng(4)
    for k, n in BF16_SHAPES[size]:
        layer = Layer(k, n)
        paths = bf16_paths(lib, layer)
        for m in BF16_ROWS[size]:
            x32, dy32 = random_inputs(rng, m, k, n)
            x16, dy16 = tf.cast(x32, tf.bfloat16), tf.cast(dy32, tf.bfloat16)
            for mode, label in ((0, "fwd"), (1, "fwd+dx")):
                fns = {}
                for name, pair in paths.items():
                    x, dy = (x16, dy16) if "16" in name else (x32, dy32)
                    fns[name] = lambda f=pair[mode], x=x, dy=dy: f(x, dy)
                ms = interleaved_ms(fns, budget_s=budget)
                print_row(f"{k:>5}x{n:<5}", m, label, ms, names, ratios)


def section_fit(size):
    import fit_epoch_cpu

    print("\n## fit: seconds per epoch, keras_qlora vs Keras float + LoRA")
    fit_epoch_cpu.run(quick=size == "quick")


def parse_sections(text):
    sections = SECTIONS if text == "all" else tuple(text.split(","))
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(
            f"unknown --section {unknown}; known: {', '.join(SECTIONS)}, all"
        )
    return sections


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller run")
    parser.add_argument(
        "--section",
        default="all",
        help=f"comma-separated: {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--budget", type=float, help="seconds per row and pass (default 3, "
        "quick 1); at least 5 calls of each path are timed"
    )
    args = parser.parse_args()
    sections = parse_sections(args.section)
    lib = loader.load()
    if lib is None:
        raise SystemExit(f"fused op not available: {loader.status()}")
    size = "quick" if args.quick else "full"
    budget = args.budget or (1.0 if args.quick else 3.0)
    print(
        f"TF {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} "
        f"CPUs, load average {os.getloadavg()[0]:.1f}; times in ms "
        "(median); ratio = other/fused (> 1: the fused op is faster); "
        f"KERAS_QLORA_CPU_ISA={os.environ.get('KERAS_QLORA_CPU_ISA', '')}"
    )
    for section in sections:
        if section == "fit":
            section_fit(size)
        else:
            globals()[f"section_{section}"](lib, size, budget)


if __name__ == "__main__":
    main()
