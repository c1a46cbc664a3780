"""The fused C++ op `KerasQLoRA>NF4Matmul` (CPU kernel) against references.

The oracle is the dequantized kernel (`dequantize_nf4`, float64 matmul) and
`nf4_matmul_reference`. Every CPU code path is exercised: the instruction
set is chosen once per process from KERAS_QLORA_CPU_ISA, so the scalar and
AVX2 kernels (and the crash-safety fuzz) run this file as a worker script in
subprocesses: `python tests/ops/test_fused_matmul.py cases|fuzz`.

The op library comes from `keras_qlora.ops.loader.load()`; when it cannot
be built the tests fail, unless KERAS_QLORA_PURE_TF=1 (then they skip).
"""

import contextlib
import json
import sys

import numpy as np
import op_library
import pytest
import tensorflow as tf
from op_library import cpu_isas
from op_library import expected_auto_isa
from op_library import load_library

from keras_qlora import ops as qops
from keras_qlora.ops import NF4Tensors
from keras_qlora.ops.reference import nf4_matmul_reference
from keras_qlora.quantizers import dequantize_nf4
from keras_qlora.quantizers import quantize_nf4

InvalidArgumentError = tf.errors.InvalidArgumentError

# (batch shape of x, K, N, block_size, double_quant, transpose, dtype).
# Small M runs the GEMV path, larger M the tiled GEMM path; K % 32 != 0
# runs the natural-order decoder, K % 32 == 0 the SIMD chunk-order one.
CASES = [
    ((1,), 64, 64, 64, True, False, "float32"),
    ((3,), 96, 40, 64, True, False, "float32"),  # blocks straddle rows
    ((5,), 33, 17, 32, False, False, "float32"),  # odd K * N
    ((1,), 64, 64, 64, True, True, "float32"),
    ((7,), 96, 40, 64, False, True, "float32"),
    ((5,), 33, 17, 32, True, True, "float32"),
    ((8,), 100, 30, 128, True, False, "float32"),  # K not a block multiple
    ((9,), 100, 30, 128, True, True, "float32"),
    ((2, 3), 128, 72, 64, True, False, "float32"),  # rank-3 x
    ((2, 3), 128, 72, 64, False, True, "float32"),
    ((40,), 256, 200, 64, True, False, "float32"),
    ((40,), 256, 200, 64, True, True, "float32"),
    ((100,), 33, 71, 256, True, False, "float32"),
    ((37,), 320, 130, 256, False, True, "float32"),
    ((4, 17), 544, 97, 32, True, False, "float32"),
    ((2,), 1024, 600, 64, True, True, "float32"),  # > one GEMV column tile
    ((3,), 96, 40, 64, True, False, "bfloat16"),
    ((3,), 96, 40, 64, True, True, "float16"),
    ((2, 20), 128, 72, 64, False, False, "bfloat16"),
    ((50,), 33, 71, 32, True, True, "float16"),
    ((6,), 65, 33, 64, False, False, "float16"),
    ((45,), 160, 96, 128, False, True, "bfloat16"),
    # M in 9..20 with K % 32 == 0: the register-decoding GEMV on AVX-512
    # (tiles of 8 x rows x 2 weight rows, K blocks of 1024); GEMM for larger
    # M and on the other ISAs.
    ((9,), 64, 64, 64, True, False, "float32"),
    ((16,), 2048, 33, 64, False, False, "float32"),  # 2 K blocks, odd N
    ((2, 9), 96, 40, 32, True, False, "bfloat16"),
    ((19,), 160, 7, 128, True, False, "float16"),
    ((20,), 1056, 18, 256, False, False, "float32"),  # partial K block
    ((21,), 64, 20, 64, True, False, "float32"),  # first M past the GEMV
    ((32,), 96, 40, 64, True, False, "float32"),
    # The GEMM (M > 20): several reduction blocks of 256 (512 for bf16),
    # several output blocks with a partial last panel of 32, row tails of
    # 1..11 under the 12-row micro-kernel, x read in place or copied with a
    # skewed stride (K = 1024: rows 4 KiB apart), bf16 pairs with an odd
    # reduction length (transpose, N = 71).
    ((61,), 544, 400, 64, True, False, "float32"),
    ((61,), 544, 400, 64, True, True, "float32"),
    ((30,), 1024, 64, 64, True, False, "float32"),
    ((25,), 1056, 100, 64, False, False, "bfloat16"),
    ((30,), 96, 71, 64, True, True, "bfloat16"),
    ((2, 23), 64, 800, 128, True, True, "bfloat16"),
    ((27,), 96, 40, 64, True, False, "float16"),
    # K % 128 == 0 on AVX-512: group order (64-byte loads, block scales
    # once per block). M = 1 scales per group, M > 1 scales the weights;
    # odd N ends on a 1-row tile; K blocks of 1024 .. 4096 with a partial
    # last one; block 256 with K % 256 != 0 (a group in either half of a
    # block); rows that straddle nested (256-block) scale groups.
    ((1,), 256, 40, 64, True, False, "float32"),
    ((1,), 384, 33, 256, True, False, "float32"),
    ((1,), 4224, 3, 32, False, False, "float32"),  # K block 4096 + 128
    ((1,), 384, 50, 32, True, False, "float32"),  # rows straddle nested
    ((3,), 1152, 20, 128, True, False, "float32"),  # K block 1024 + 128
    ((11,), 256, 24, 64, False, False, "bfloat16"),  # 8 + 3 rows of x
    ((20,), 128, 9, 32, True, False, "float32"),  # 8 + 8 + 4 rows of x
    # transpose in group order: 4 rows of W^T per pass, then single rows
    ((1,), 384, 7, 256, True, True, "float32"),
    ((5,), 640, 13, 32, False, True, "float16"),
    ((1,), 4096, 6, 64, True, True, "float32"),  # several column tiles
    ((12,), 256, 66, 128, True, True, "float32"),
    ((3,), 128, 300, 64, True, True, "float32"),  # a row range per thread
    ((17,), 256, 40, 64, True, True, "float32"),  # GEMV up to M = 20
    ((0,), 64, 32, 64, True, False, "float32"),  # M = 0
    ((2, 0), 64, 32, 64, False, True, "bfloat16"),
]


@pytest.fixture(scope="module")
def lib():
    return load_library()


def make_state(k, n, block_size, double_quant, seed=0):
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal((k, n)).astype("float32")
    return quantize_nf4(
        kernel,
        block_size=block_size,
        double_quant=double_quant,
        scale_search=False,
    )


def op_args(state):
    """The op's four state inputs for an `NF4State`."""
    if state.double_quant:
        scale, offset = state.absmax_scale, np.float32(state.absmax_offset)
    else:  # ignored by the kernel: pass an empty vector and 0
        scale, offset = np.zeros((0,), "float32"), np.float32(0)
    return (state.packed, state.absmax, scale, offset)


def run_op(lib, x, state, transpose, block_size=None):
    k, n = state.shape
    return lib.keras_q_lo_ra_nf4_matmul(
        x,
        *op_args(state),
        k=k,
        n=n,
        block_size=block_size or state.block_size,
        transpose=transpose,
    )


def check_case(lib, batch, k, n, block_size, double_quant, transpose, dtype):
    """Runs one case and asserts it matches the float64 oracle."""
    state = make_state(k, n, block_size, double_quant, seed=k * n)
    rng = np.random.default_rng(k + n)
    x = tf.cast(rng.standard_normal(batch + (n if transpose else k,)), dtype)
    y = run_op(lib, x, state, transpose)
    assert y.dtype == x.dtype
    assert tuple(y.shape) == tuple(batch) + (k if transpose else n,)
    w = dequantize_nf4(state).astype(np.float64)  # (K, N)
    w = w.T if transpose else w
    x64 = tf.cast(x, tf.float32).numpy().astype(np.float64)
    expected = x64 @ w
    # float32 accumulation in any order: bounded by |x| @ |W|; bf16 / fp16
    # outputs add one rounding of the result.
    bound = 2e-5 * (np.abs(x64) @ np.abs(w)) + 1e-30
    rel = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    bound += rel * np.abs(expected)
    if dtype == "bfloat16":
        # With AVX512_BF16 the GEMM path rounds each dequantized weight to
        # bf16 (as TensorFlow's bf16 matmul rounds both operands): a relative
        # error of at most 2**-9 per product.
        bound += 2.0**-9 * (np.abs(x64) @ np.abs(w))
    got = tf.cast(y, tf.float32).numpy().astype(np.float64)
    excess = np.abs(got - expected) - bound
    assert np.all(excess <= 0), (
        f"case {(batch, k, n, block_size, double_quant, transpose, dtype)}: "
        f"max excess {excess.max():.3g}"
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_dequantized_oracle(lib, case):
    check_case(lib, *case)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("m", [1, 70])
def test_matches_pure_reference(lib, transpose, m):
    k, n = 160, 96
    state = make_state(k, n, 64, True)
    x = tf.constant(
        np.random.default_rng(1).standard_normal((m, n if transpose else k)),
        tf.float32,
    )
    y = run_op(lib, x, state, transpose)
    expected = nf4_matmul_reference(
        x, NF4Tensors.from_state(state), transpose=transpose
    )
    np.testing.assert_allclose(
        y.numpy(), expected.numpy(), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("transpose", [False, True])
def test_bf16_matches_tensorflow_bf16_matmul(lib, transpose):
    # The accuracy contract of bf16 x: that of TensorFlow's own bf16 matmul
    # of x with the dequantized weight in bf16 (both operands rounded to
    # bf16, float32 accumulation, a bf16 result). Where the CPU has
    # AVX512_BF16 the op runs exactly that (vdpbf16ps); elsewhere it computes
    # in float32, which is closer to the exact product still.
    k, n, m = 320, 96, 64
    state = make_state(k, n, 64, True)
    rng = np.random.default_rng(3)
    x = tf.cast(rng.standard_normal((m, n if transpose else k)), tf.bfloat16)
    w = tf.cast(dequantize_nf4(state), tf.bfloat16)
    expected = tf.matmul(x, w, transpose_b=transpose)
    got = run_op(lib, x, state, transpose)
    e64 = tf.cast(expected, tf.float64).numpy()
    g64 = tf.cast(got, tf.float64).numpy()
    x64 = tf.cast(x, tf.float64).numpy()
    w64 = tf.cast(w, tf.float64).numpy()
    w64 = w64.T if transpose else w64
    # Each side rounds its float32 sum to bf16 once (2**-8 relative each);
    # the float32 sums differ only in order; the float32 fallback differs
    # by the weights' bf16 rounding (2**-9 per product).
    bound = 2.0**-7 * np.abs(e64) + (2e-5 + 2.0**-9) * (
        np.abs(x64) @ np.abs(w64)
    )
    assert np.all(np.abs(g64 - e64) <= bound)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("k", [64, 128])  # chunk order, group order
def test_double_quant_scales_bitwise(lib, k, transpose):
    # One nonzero code per block isolates the block scale: the op must
    # decode it exactly as dequantize_nf4 does (multiply, then add).
    n, bs = 8 * 256 // 8, 64  # 256 rows of W^T: 256 or 512 blocks
    state = make_state(k, n, bs, True)
    x = np.zeros((1, n if transpose else k), "float32")
    x[0, 0] = 1.0
    y = run_op(lib, tf.constant(x), state, transpose).numpy()
    w = dequantize_nf4(state)  # (K, N)
    np.testing.assert_array_equal(y[0], w[:, 0] if transpose else w[0])


def test_bad_isa_env_is_an_error():
    out = run_worker("cases", {"KERAS_QLORA_CPU_ISA": "sse9"})
    assert out.returncode != 0
    assert "KERAS_QLORA_CPU_ISA must be one of" in out.stdout + out.stderr


@pytest.mark.parametrize(
    "isa", ["scalar", "avx2", "avx512", "avx512_bf16", "auto"]
)
def test_each_isa_in_a_subprocess(isa):
    out = run_worker("cases", {"KERAS_QLORA_CPU_ISA": isa})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["passed"] == len(CASES)
    expected = {"auto": expected_auto_isa()}.get(isa, isa)
    if expected in cpu_isas():  # else it falls back, with a warning
        assert f"CPU kernels: {expected}" in out.stderr


def test_fuzz_never_crashes():
    pytest.importorskip("hypothesis")  # in the `test` extras
    out = run_worker("fuzz", {})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"] + report["invalid"] == report["examples"] > 0
    assert report["ok"] > 0 and report["invalid"] > 0


# ------------------------------------------------------------ bad inputs

GOOD = dict(k=64, n=32, block_size=64)  # 2048 elements, 32 blocks


def call(
    lib, x=None, packed=None, absmax=None, scale=None, offset=None, **attrs
):
    state = make_state(GOOD["k"], GOOD["n"], GOOD["block_size"], True)
    base = op_args(state)
    args = [
        np.ones((2, GOOD["k"]), "float32") if x is None else x,
        base[0] if packed is None else packed,
        base[1] if absmax is None else absmax,
        base[2] if scale is None else scale,
        base[3] if offset is None else offset,
    ]
    return lib.keras_q_lo_ra_nf4_matmul(*args, **{**GOOD, **attrs})


# Wrong dtypes of fixed-type inputs are refused by TF's Python wrapper
# (ValueError) before the kernel runs; attr dtypes by the op's type lists.
BAD_DTYPES = [
    ("x int32", dict(x=tf.ones((2, 64), tf.int32)), "attr 'T'"),
    ("absmax int32", dict(absmax=tf.zeros((32,), tf.int32)), "absmax_type"),
    ("packed float", dict(packed=tf.zeros((1024,))), "requested dtype uint8"),
    (
        "scale uint8",
        dict(scale=tf.zeros((1,), tf.uint8)),
        "requested dtype float32",
    ),
]


@pytest.mark.parametrize(
    "kwargs,match", [c[1:] for c in BAD_DTYPES], ids=[c[0] for c in BAD_DTYPES]
)
def test_bad_dtype_is_refused(lib, kwargs, match):
    with pytest.raises(
        (InvalidArgumentError, TypeError, ValueError), match=match
    ):
        call(lib, **kwargs)


BAD_INPUTS = [
    ("packed short", dict(packed=np.zeros(1023, np.uint8)), "packed must"),
    ("packed long", dict(packed=np.zeros(1025, np.uint8)), "packed must"),
    ("packed 2-D", dict(packed=np.zeros((2, 512), np.uint8)), "packed must"),
    ("absmax short", dict(absmax=np.zeros(31, np.uint8)), "absmax must"),
    ("absmax long f32", dict(absmax=np.ones(33, np.float32)), "absmax must"),
    ("scale long", dict(scale=np.ones(2, np.float32)), "absmax_scale must"),
    ("scale empty", dict(scale=np.ones(0, np.float32)), "absmax_scale must"),
    ("offset vector", dict(offset=np.ones(1, np.float32)), "scalar"),
    ("x last dim", dict(x=np.ones((2, 63), np.float32)), "last axis"),
    (
        "x transposed dim",
        dict(x=np.ones((2, 64), np.float32), transpose=True),
        "last axis",
    ),
    ("x rank 1", dict(x=np.ones(64, np.float32)), "rank >= 2"),
    (
        "k * n mismatch",
        dict(k=32, n=64 + 2, x=np.ones((1, 32), np.float32)),
        "packed must",
    ),
    ("k zero", dict(k=0), "attr 'k'"),
    ("n negative", dict(n=-3), "attr 'n'"),
    ("block 48", dict(block_size=48), "block_size must be one of"),
    ("block 512", dict(block_size=512), "block_size must be one of"),
    ("k * n overflow", dict(k=2**40, n=2**40), "overflows int64"),
]


@pytest.mark.parametrize(
    "kwargs,match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_invalid_argument(lib, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        call(lib, **kwargs)


def test_float_absmax_ignores_scale_and_offset(lib):
    state = make_state(64, 32, 64, False)
    x = tf.ones((2, 64))
    y = lib.keras_q_lo_ra_nf4_matmul(
        x,
        state.packed,
        state.absmax,
        np.ones(7, np.float32),
        np.ones(3, np.float32),
        k=64,
        n=32,
        block_size=64,
    )
    np.testing.assert_allclose(
        y.numpy(), x.numpy() @ dequantize_nf4(state), rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------ subprocesses


def run_worker(mode, env):
    return op_library.run_worker(__file__, mode, env, timeout=300)


def worker_cases():
    lib = load_library()
    for case in CASES:
        check_case(lib, *case)
    print(json.dumps({"passed": len(CASES)}))


def worker_fuzz(examples=150):
    """Random sizes and buffer lengths: a clean error or a correct result."""
    from hypothesis import HealthCheck
    from hypothesis import given
    from hypothesis import settings
    from hypothesis import strategies as st

    lib = load_library()
    counts = {"ok": 0, "invalid": 0, "examples": 0}

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        k=st.integers(1, 300),  # up to two GEMM reduction blocks
        n=st.integers(1, 80),
        m=st.integers(0, 40),
        block=st.sampled_from([32, 64, 128, 256, 16, 96]),
        double_quant=st.booleans(),
        transpose=st.booleans(),
        dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
        deltas=st.lists(
            st.sampled_from([0, 0, 0, -1, 1, 5]), min_size=4, max_size=4
        ),
    )
    def fuzz(k, n, m, block, double_quant, transpose, dtype, deltas):
        counts["examples"] += 1
        valid_block = block in (32, 64, 128, 256)
        state = make_state(k, n, block if valid_block else 64, double_quant)
        packed, absmax, scale, offset = op_args(state)
        packed = np.resize(packed, max(0, packed.size + deltas[0]))
        absmax = np.resize(absmax, max(0, absmax.size + deltas[1]))
        if double_quant:
            scale = np.resize(scale, max(0, scale.size + deltas[2]))
        in_dim = max(0, (n if transpose else k) + deltas[3])
        x = tf.cast(np.ones((m, in_dim)), dtype)
        bad = (
            not valid_block
            or packed.size != state.packed.size
            or absmax.size != state.absmax.size
            or (double_quant and scale.size != state.absmax_scale.size)
            or deltas[3] != 0
        )
        try:
            y = lib.keras_q_lo_ra_nf4_matmul(
                x,
                packed,
                absmax,
                scale,
                offset,
                k=k,
                n=n,
                block_size=block,
                transpose=transpose,
            )
        except InvalidArgumentError as err:
            assert bad, f"unexpected error: {err}"
            assert "NF4Matmul" in str(err)
            counts["invalid"] += 1
            return
        assert not bad, "invalid input accepted"
        w = dequantize_nf4(state)
        expected = x.numpy().astype(np.float64) @ (w.T if transpose else w)
        got = tf.cast(y, tf.float32).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-2)
        counts["ok"] += 1

    fuzz()
    print(json.dumps(counts))


if __name__ == "__main__":
    {"cases": worker_cases, "fuzz": worker_fuzz}[sys.argv[1]]()


# ----------------------------------------- one validation for both paths

WRAPPER_BAD = [
    ("packed short", dict(packed=np.zeros(1023, np.uint8)), "packed must"),
    ("absmax short", dict(absmax=np.zeros(31, np.uint8)), "absmax must"),
    ("uint8 absmax, no scale", dict(scale=None, offset=None), "required"),
    (
        "float absmax, stray scale",
        dict(absmax=np.ones(32, np.float32)),
        "takes no absmax_scale",
    ),
    ("scale long", dict(scale=np.ones(2, np.float32)), "absmax_scale must"),
    ("offset vector", dict(offset=np.ones(1, np.float32)), "scalar"),
    ("block 0", dict(block_size=0), "block_size must be one of"),
    ("x rank 1", dict(x=np.ones(64, np.float32)), "rank >= 2"),
    ("x last dim", dict(x=np.ones((2, 63), np.float32)), "last axis"),
]


@pytest.mark.parametrize("pure", [False, True], ids=["fused", "pure"])
@pytest.mark.parametrize(
    "kwargs,match",
    [c[1:] for c in WRAPPER_BAD],
    ids=[c[0] for c in WRAPPER_BAD],
)
def test_wrapper_refuses_the_same_inputs_on_both_paths(pure, kwargs, match):
    state = make_state(GOOD["k"], GOOD["n"], GOOD["block_size"], True)
    weight = NF4Tensors.from_state(state)
    arrays = dict(
        packed=weight.packed,
        absmax=weight.absmax,
        absmax_scale=weight.absmax_scale,
        absmax_offset=weight.absmax_offset,
    )
    renames = {"scale": "absmax_scale", "offset": "absmax_offset"}
    kwargs = dict(kwargs)  # shared by the two paths' cases
    x = kwargs.pop("x", np.ones((2, GOOD["k"]), "float32"))
    block_size = kwargs.pop("block_size", GOOD["block_size"])
    arrays.update({renames.get(k, k): v for k, v in kwargs.items()})
    weight = NF4Tensors(
        **arrays, shape=(GOOD["k"], GOOD["n"]), block_size=block_size
    )
    context = qops.reference_path() if pure else contextlib.nullcontext()
    with context, pytest.raises(ValueError, match=match):
        qops.nf4_matmul(x, weight)
