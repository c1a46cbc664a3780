"""The CPU kernels of the fused ops with the fp4 and int8 base formats.

`KerasQLoRA>NF4Matmul` with `quant_type="fp4"` / `"int8"` against a float64
oracle built from the contract (format_helpers.py), on every CPU code path:
the matmul kernels pick their instruction set once per process, so each
KERAS_QLORA_CPU_ISA value runs this file as a worker script in a
subprocess (`python tests/ops/test_fused_formats.py cases`), as
test_fused_matmul.py does for nf4. The quantize ops with `quant_type="fp4"`
must equal the numpy rules bit for bit on every path (they read
KERAS_QLORA_CPU_ISA on each call).

The op library comes from `keras_qlora.ops.loader.load()`; when it cannot
be built the tests fail, unless KERAS_QLORA_PURE_TF=1 (then they skip).
"""

import json
import sys
import time

import format_helpers as fh
import numpy as np
import op_library
import pytest
import tensorflow as tf
from op_library import cpu_isas
from op_library import load_library

InvalidArgumentError = tf.errors.InvalidArgumentError
QUANTIZE_ISAS = ("scalar", "avx2", "avx512")

# (batch shape of x, K, N, block_size, double_quant, transpose, dtype) per
# format. M = 1..12 runs the GEMV kernels (AVX-512: up to 20, in chunk or
# group order for 4-bit formats with K % 32 / K % 128 == 0), larger M the
# GEMM (bf16 x: the vdpbf16ps micro-kernel on AVX512_BF16).
FP4_CASES = [
    ((1,), 64, 64, 64, True, False, "float32"),  # chunk order
    ((1,), 256, 40, 64, True, False, "float32"),  # group order, M = 1
    ((3,), 128, 33, 32, False, False, "bfloat16"),  # group order, M > 1
    ((12,), 96, 40, 64, True, True, "float16"),  # chunk-order transpose
    ((1,), 384, 7, 256, True, True, "float32"),  # group-order transpose
    ((20,), 1056, 18, 256, False, False, "float32"),  # register GEMV
    ((20,), 256, 40, 64, True, True, "float32"),
    ((3,), 33, 17, 32, False, False, "float32"),  # natural order, odd K * N
    ((5,), 100, 30, 128, True, True, "float16"),  # partial last block
    ((24,), 544, 97, 32, True, False, "float32"),  # GEMM, AVX-512 packing
    ((24,), 96, 71, 64, True, True, "bfloat16"),  # bf16 GEMM, odd pairs
    ((2, 20), 128, 72, 64, False, False, "bfloat16"),
    ((45,), 70, 33, 64, True, False, "float16"),  # K % 32 != 0
    ((100,), 33, 71, 256, True, False, "float32"),  # one partial block
    ((100,), 160, 96, 128, False, True, "bfloat16"),
    ((100,), 70, 51, 32, False, True, "float32"),
]
# int8: block_size is K (None here), no double quant. K = 1, odd, not a
# power of two; M on both sides of every threshold.
INT8_CASES = [
    ((1,), 64, 64, None, False, False, "float32"),
    ((1,), 70, 33, None, False, False, "float32"),
    ((1,), 70, 33, None, False, True, "float32"),
    ((3,), 300, 17, None, False, False, "bfloat16"),
    ((3,), 300, 17, None, False, True, "float16"),
    ((12,), 70, 41, None, False, True, "float16"),
    ((12,), 71, 9, None, False, False, "float32"),
    ((20,), 300, 40, None, False, False, "float32"),
    ((20,), 128, 40, None, False, True, "bfloat16"),
    ((24,), 70, 71, None, False, True, "float32"),
    ((24,), 71, 33, None, False, False, "bfloat16"),  # odd K: a half pair
    ((100,), 71, 50, None, False, False, "bfloat16"),
    ((100,), 300, 71, None, False, True, "bfloat16"),  # odd N (transpose)
    ((100,), 128, 96, None, False, False, "float32"),
    ((2, 13), 256, 40, None, False, True, "float16"),
    ((30,), 1, 5, None, False, False, "float32"),  # K = 1
    ((30,), 1, 5, None, False, True, "bfloat16"),
    ((1,), 1, 1, None, False, False, "float32"),
    ((40,), 600, 300, None, False, False, "float32"),  # several GEMM blocks
    ((40,), 600, 300, None, False, True, "bfloat16"),
    ((1,), 4096, 8, None, False, True, "float32"),  # several column tiles
    ((0,), 70, 3, None, False, False, "float32"),  # M = 0
]
CASES = [("fp4",) + c for c in FP4_CASES] + [("int8",) + c for c in INT8_CASES]


def case_id(case):
    return "-".join(map(str, case))


@pytest.fixture(scope="module")
def lib():
    return load_library()


# ------------------------------------------------------------ states


def make_state(quant, k, n, block_size, double_quant, seed=0):
    """(op inputs dict, float32 kernel [K, N] it represents)."""
    if quant == "int8":
        packed, scb = fh.int8_state(k, n, seed)
        inputs = dict(
            packed=packed,
            absmax=scb,
            absmax_scale=np.zeros((0,), np.float32),
            absmax_offset=np.float32(0),
            k=k,
            n=n,
            block_size=k,
            quant_type="int8",
        )
        return inputs, fh.dequantize_int8(packed, scb, k, n)
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal((k, n)).astype(np.float32)
    state = fh.quantize_fp4(kernel, block_size, double_quant, False)
    if double_quant:
        scale = state["absmax_scale"]
        offset = np.float32(state["absmax_offset"])
    else:
        scale, offset = np.zeros((0,), np.float32), np.float32(0)
    inputs = dict(
        packed=state["packed"],
        absmax=state["absmax"],
        absmax_scale=scale,
        absmax_offset=offset,
        k=k,
        n=n,
        block_size=block_size,
        quant_type="fp4",
    )
    w = fh.dequantize_fp4(state["packed"], state["scales"], k, n, block_size)
    return inputs, w


def run_op(lib, x, inputs, transpose):
    return lib.keras_q_lo_ra_nf4_matmul(
        x,
        inputs["packed"],
        inputs["absmax"],
        inputs["absmax_scale"],
        inputs["absmax_offset"],
        k=inputs["k"],
        n=inputs["n"],
        block_size=inputs["block_size"],
        transpose=transpose,
        quant_type=inputs["quant_type"],
    )


def check_case(lib, quant, batch, k, n, block_size, dq, transpose, dtype):
    """Runs one case and asserts it matches the float64 oracle."""
    inputs, w = make_state(quant, k, n, block_size, dq, seed=k * n + 1)
    rng = np.random.default_rng(k + n)
    x = tf.cast(rng.standard_normal(batch + (n if transpose else k,)), dtype)
    y = run_op(lib, x, inputs, transpose)
    assert y.dtype == x.dtype
    assert tuple(y.shape) == tuple(batch) + (k if transpose else n,)
    w = w.astype(np.float64)
    w = w.T if transpose else w
    x64 = tf.cast(x, tf.float32).numpy().astype(np.float64)
    expected = x64 @ w
    # float32 sums in any order; bf16 / fp16 outputs round once more; the
    # bf16 GEMM rounds each weight to bf16 (2**-9 per product).
    magnitude = np.abs(x64) @ np.abs(w)
    bound = 2e-5 * magnitude + 1e-30
    rel = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    bound += rel * np.abs(expected)
    if dtype == "bfloat16":
        bound += 2.0**-9 * magnitude
    got = tf.cast(y, tf.float32).numpy().astype(np.float64)
    excess = np.abs(got - expected) - bound
    case = (quant, batch, k, n, block_size, dq, transpose, dtype)
    assert np.all(excess <= 0), f"{case}: max excess {excess.max():.3g}"


# (format, K, N, block_size, double_quant) for the exact-decoding check.
EXACT = [
    ("fp4", 64, 40, 64, True),  # chunk order
    ("fp4", 256, 24, 32, True),  # group order
    ("fp4", 70, 33, 128, False),  # natural order
    ("int8", 70, 33, None, False),
    ("int8", 300, 24, None, False),
    ("int8", 64, 40, None, False),
]


def check_exact(lib, quant, k, n, block_size, dq):
    """x = rows of the identity: y must be the decoded weights exactly (each
    element is one product by 1.0), for GEMV (M <= 12) and GEMM (M = K or
    N) in both directions; bf16 x gets them rounded to bf16."""
    inputs, w = make_state(quant, k, n, block_size, dq, seed=7)
    for transpose in (False, True):
        rows = n if transpose else k
        want = w.T if transpose else w  # (rows, outputs)
        eye = np.eye(rows, dtype=np.float32)
        for sel in (slice(0, 1), slice(rows - 3, rows), slice(0, rows)):
            for dtype in (tf.float32, tf.bfloat16):
                x = tf.cast(eye[sel], dtype)
                got = run_op(lib, x, inputs, transpose)
                expected = tf.cast(want[sel], dtype)
                np.testing.assert_array_equal(
                    tf.cast(got, tf.float32).numpy(),
                    tf.cast(expected, tf.float32).numpy(),
                    err_msg=f"{quant} k={k} n={n} {transpose} {sel} {dtype}",
                )


def int8_seconds(lib, transpose, repeat=3):
    """Best time of an int8 GEMV with M = 1 and a 4096 x 4096 weight."""
    k = n = 4096
    packed, scb = fh.int8_state(k, n, seed=5)
    inputs = dict(
        packed=tf.constant(packed),
        absmax=tf.constant(scb),
        absmax_scale=tf.zeros((0,)),
        absmax_offset=tf.constant(0.0),
        k=k,
        n=n,
        block_size=k,
        quant_type="int8",
    )
    x = tf.ones((1, k))
    run_op(lib, x, inputs, transpose)  # warm up
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        run_op(lib, x, inputs, transpose).numpy()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_float64_oracle(lib, case):
    check_case(lib, *case)


@pytest.mark.parametrize("case", EXACT, ids=case_id)
def test_decodes_every_element_exactly(lib, case):
    check_exact(lib, *case)


def test_fp4_and_nf4_differ_only_in_the_table(lib):
    # The same packed bytes and scales read as nf4 and as fp4.
    inputs, w_fp4 = make_state("fp4", 64, 32, 64, False, seed=3)
    x = tf.constant(np.eye(64, dtype=np.float32)[:5])
    got_fp4 = run_op(lib, x, inputs, False).numpy()
    got_nf4 = run_op(lib, x, dict(inputs, quant_type="nf4"), False).numpy()
    np.testing.assert_array_equal(got_fp4, w_fp4[:5])
    from keras_qlora.quantizers import codes

    scales = inputs["absmax"]
    nf4 = codes.NF4_CODE[fh.unpack_codes(inputs["packed"], 64 * 32)]
    w_nf4 = (nf4.reshape(-1, 64) * scales[:, None]).reshape(32, 64).T
    np.testing.assert_array_equal(got_nf4, w_nf4[:5])


# ------------------------------------------------------------ bad inputs


def int8_call(lib, **changes):
    inputs, _ = make_state("int8", 70, 30, None, False)
    inputs.update(changes)
    x = np.ones((2, 70), np.float32)
    return run_op(lib, x, inputs, False)


BAD_INT8 = [
    ("block_size != k", dict(block_size=64), r"block_size must equal k=70"),
    ("block_size 0", dict(block_size=0), r"attr .block_size."),
    (
        "uint8 absmax",
        dict(
            absmax=np.zeros(30, np.uint8),
            absmax_scale=np.ones(1, np.float32),
        ),
        r"int8 takes float32 absmax",
    ),
    (
        "packed 4-bit size",
        dict(packed=np.zeros(70 * 30 // 2, np.uint8)),
        r"packed must be 1-D with k \* n = 2100 bytes",
    ),
    (
        "packed one short",
        dict(packed=np.zeros(70 * 30 - 1, np.uint8)),
        r"packed must be 1-D with k \* n",
    ),
    (
        "absmax per block of 64",
        dict(absmax=np.ones(33, np.float32)),
        r"absmax must be 1-D with .* = 30 entries",
    ),
]


@pytest.mark.parametrize(
    "changes,match", [c[1:] for c in BAD_INT8], ids=[c[0] for c in BAD_INT8]
)
def test_bad_int8_input_is_invalid_argument(lib, changes, match):
    with pytest.raises(InvalidArgumentError, match=match):
        int8_call(lib, **changes)


def test_bad_fp4_input_is_invalid_argument(lib):
    inputs, _ = make_state("fp4", 64, 32, 64, True)
    x = np.ones((2, 64), np.float32)
    with pytest.raises(InvalidArgumentError, match="block_size must be one"):
        run_op(lib, x, dict(inputs, block_size=64 * 32), False)
    with pytest.raises(InvalidArgumentError, match=r"packed must .*fp4"):
        run_op(lib, x, dict(inputs, packed=np.zeros(2048, np.uint8)), False)


def test_unknown_quant_type_is_refused(lib):
    inputs, _ = make_state("int8", 70, 30, None, False)
    with pytest.raises(
        (InvalidArgumentError, ValueError, TypeError), match="quant_type"
    ):
        x = np.ones((1, 70), np.float32)
        run_op(lib, x, dict(inputs, quant_type="int4"), False)


# ------------------------------------------------------------ every ISA


def run_worker(env):
    return op_library.run_worker(__file__, "cases", env, timeout=600)


@pytest.mark.parametrize(
    "isa", ["scalar", "avx2", "avx512", "avx512_bf16", "auto"]
)
def test_each_isa_in_a_subprocess(isa):
    out = run_worker({"KERAS_QLORA_CPU_ISA": isa})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["passed"] == len(CASES)
    assert report["exact"] == len(EXACT)
    if isa in cpu_isas():
        assert f"CPU kernels: {isa}" in out.stderr
    # int8 speed is not a target, but M = 1 with a 4096 x 4096 weight
    # (16 M elements) must take milliseconds, not seconds.
    for name, seconds in report["int8_seconds"].items():
        print(f"{isa}: int8 M=1 4096x4096 {name}: {seconds * 1e3:.1f} ms")
        assert seconds < 1.0, (isa, name, seconds)


def worker_cases():
    lib = load_library()
    for case in CASES:
        check_case(lib, *case)
    for case in EXACT:
        check_exact(lib, *case)
    seconds = {
        "forward": int8_seconds(lib, False),
        "transpose": int8_seconds(lib, True),
    }
    print(
        json.dumps(
            {"passed": len(CASES), "exact": len(EXACT), "int8_seconds": seconds}
        )
    )


# ------------------------------------------------------------ fp4 quantize


@pytest.fixture
def isa(monkeypatch):
    """Returns a function that selects the quantize ops' CPU path."""

    def select(name):
        monkeypatch.setenv("KERAS_QLORA_CPU_ISA", name)

    return select


def test_fp4_midpoints_tie_to_the_lower_value():
    # The contract's rounding: a value equal to a midpoint takes the lower
    # neighbour; 0.0 (and -0.0) code 0, a tiny positive value code 8.
    codes = fh.fp4_codes_of(fh.FP4_MIDPOINTS)
    assert np.array_equal(codes, fh.FP4_SORTED_CODES[:-1])
    assert fh.fp4_codes_of(np.float32([0.0, -0.0, 1e-30]))[2] == 8
    assert list(fh.fp4_codes_of(np.float32([0.0, -0.0]))) == [0, 0]


def boundary_values():
    """Every fp4 midpoint and lookup-bucket edge (multiples of 1/16), zeros,
    tiny values of both signs, values past +-1, each with float32
    neighbours; a multiple of 64 of them."""
    points = np.concatenate(
        [
            fh.FP4_MIDPOINTS,
            np.arange(-16, 17, dtype=np.float32) / 16,
            [0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45, 2.0**-126, 2, -2],
        ]
    ).astype(np.float32)
    values = [points]
    for _ in range(3):
        values.append(np.nextafter(values[-1], np.float32(np.inf)))
        values.append(np.nextafter(values[-2], np.float32(-np.inf)))
    values = np.concatenate(values).astype(np.float32)
    return values[: values.size // 64 * 64].reshape(-1, 64)


@pytest.mark.parametrize("scale", [1.0, 0.7, 3.0])
def test_fp4_encode_at_decision_boundaries(lib, isa, scale):
    values = boundary_values()
    scale = np.float32(scale)
    weight_t = (values * scale).astype(np.float32)
    scales = np.full(weight_t.shape[0], scale, np.float32)
    want = fh.encode_fp4(weight_t, scales, 64)
    # Under scale 1 the values themselves are looked up: ties included.
    if scale == 1:
        direct = fh.pack_codes(fh.fp4_codes_of(values.reshape(-1)), 0)
        np.testing.assert_array_equal(want, direct)
    for name in QUANTIZE_ISAS:
        isa(name)
        got = lib.keras_q_lo_ra_nf4_encode(
            weight_t, scales, block_size=64, quant_type="fp4"
        )
        np.testing.assert_array_equal(got.numpy(), want, err_msg=name)


def fp4_kernel(shape, seed, zeros=0.1):
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal(shape).astype(np.float32)
    kernel[rng.random(shape) < zeros] = 0.0
    return kernel


def check_fp4_ops(lib, isa, weight_t, block_size):
    """Both ops, every flag, every path, against the numpy rules."""
    for search in (False, True):
        want_scales = fh.block_scales_fp4(weight_t, block_size, search)
        want = {
            divide: fh.encode_fp4(weight_t, want_scales, block_size, divide)
            for divide in (False, True)
        }
        for name in QUANTIZE_ISAS:
            isa(name)
            scales = lib.keras_q_lo_ra_nf4_block_scales(
                weight_t,
                block_size=block_size,
                scale_search=search,
                quant_type="fp4",
            ).numpy()
            np.testing.assert_array_equal(scales, want_scales, err_msg=name)
            for divide in (False, True):
                packed = lib.keras_q_lo_ra_nf4_encode(
                    weight_t,
                    want_scales,
                    block_size=block_size,
                    divide_tail=divide,
                    quant_type="fp4",
                ).numpy()
                np.testing.assert_array_equal(
                    packed, want[divide], err_msg=f"{name} {divide}"
                )


@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
@pytest.mark.parametrize("shape", [(1, 1), (19, 37), (3, 77), (64, 64),
                                   (40, 96), (257, 30)])  # fmt: skip
def test_fp4_quantize_ops_match_numpy(lib, isa, shape, block_size):
    weight_t = fp4_kernel(shape, seed=shape[0] * 1000 + shape[1])
    check_fp4_ops(lib, isa, weight_t, block_size)


def test_fp4_zero_blocks_tiny_values_and_zero_tail(lib, isa):
    weight_t = fp4_kernel((21, 50), seed=3)  # 1050 = 16 * 64 + 26
    flat = weight_t.reshape(-1)
    flat[64:192] = 0.0  # two whole zero blocks
    flat[200:210] = np.float32(1e-30)  # tiny positives beside large values
    flat[210:215] = np.float32(-1e-30)
    flat[256:320] = np.float32(1e-30)  # a block of one tiny value
    flat[1024:] = 0.0  # zero partial tail (absmax clamped to 1e-38)
    for block_size in (32, 64):
        check_fp4_ops(lib, isa, weight_t, block_size)
    packed = lib.keras_q_lo_ra_nf4_encode(
        weight_t,
        fh.block_scales_fp4(weight_t, 64, False),
        block_size=64,
        quant_type="fp4",
    ).numpy()
    codes = fh.unpack_codes(packed, flat.size)
    assert np.all(codes[64:192] == 0)  # zero blocks: code 0
    assert np.all(codes[200:210] == 8)  # tiny positive: code 8
    assert np.all(codes[1024:] == 0)


def test_fp4_all_zero_and_wide_range(lib, isa):
    check_fp4_ops(lib, isa, np.zeros((37, 19), np.float32), 32)
    rows = np.float32(10.0) ** np.linspace(-44, 0, 96).astype(np.float32)
    spread = (fp4_kernel((96, 128), seed=5) * rows[:, None]).astype(np.float32)
    check_fp4_ops(lib, isa, spread, 64)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("scale_search", [True, False])
def test_quantize_fused_fp4_state(lib, isa, double_quant, scale_search):
    from keras_qlora.ops.quantize import quantize_nf4_fused

    kernel = fp4_kernel((100, 45), seed=9)  # 4500 = 70 * 64 + 20
    want = fh.quantize_fp4(kernel, 64, double_quant, scale_search)
    for name in QUANTIZE_ISAS:
        isa(name)
        state = quantize_nf4_fused(
            kernel,
            block_size=64,
            double_quant=double_quant,
            scale_search=scale_search,
            quant_type="fp4",
        )
        np.testing.assert_array_equal(state.packed, want["packed"])
        np.testing.assert_array_equal(state.absmax, want["absmax"])
        if double_quant:
            np.testing.assert_array_equal(
                state.absmax_scale, want["absmax_scale"]
            )
            assert state.absmax_offset == want["absmax_offset"]


def test_quantize_fused_refuses_int8():
    from keras_qlora.ops.quantize import quantize_nf4_fused

    with pytest.raises(
        ValueError,
        match=r"quant_type must be a 4-bit format, one of \('nf4', 'fp4'\)"
        r".*Received: quant_type='int8'",
    ):
        quantize_nf4_fused(np.ones((4, 4), np.float32), quant_type="int8")


if __name__ == "__main__":
    {"cases": worker_cases}[sys.argv[1]]()
