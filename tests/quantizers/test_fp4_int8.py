"""The FP4 and int8 base formats: bitsandbytes' bytes, round trips, errors.

bitsandbytes quantizes a torch Linear weight `[N, K]`; we quantize the Keras
kernel `[K, N]`, so every comparison feeds it `W.T`.
"""

import numpy as np
import pytest

from keras_qlora.quantizers import FP4_CODE
from keras_qlora.quantizers import QUANT_TYPES
from keras_qlora.quantizers import NF4State
from keras_qlora.quantizers import codes
from keras_qlora.quantizers import dequantize
from keras_qlora.quantizers import quantize
from keras_qlora.quantizers import quantize_4bit
from keras_qlora.quantizers import quantize_int8

# (K, N, block size): partial last blocks, > 256 blocks (several nested
# scales), odd K (bitsandbytes' pure-torch dequantization), one element.
SHAPES = [
    (37, 19, 32),
    (64, 40, 64),
    (1, 1, 64),
    (130, 70, 64),
    (257, 129, 128),
]


def kernel(k, n, seed=0, scale=0.02):
    rng = np.random.default_rng(seed + 31 * k + n)
    return (rng.standard_normal((k, n)) * scale).astype(np.float32)


def torch_t(bnb, w):
    return bnb.torch.from_numpy(np.ascontiguousarray(w.T))


# -- FP4 --------------------------------------------------------------------


def test_fp4_table_and_rounding_are_bitsandbytes(bnb):
    theirs = bnb.functional.get_4bit_type("fp4", device="cpu").numpy()
    np.testing.assert_array_equal(FP4_CODE, theirs)
    assert [float(v).hex() for v in FP4_CODE] == [
        float(v).hex() for v in theirs
    ]
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds, order = _get_4bit_quantize_bounds("fp4", bnb.torch.device("cpu"))
    fmt = codes.FOUR_BIT_FORMATS["fp4"]
    np.testing.assert_array_equal(fmt.midpoints, bounds.numpy())
    np.testing.assert_array_equal(fmt.order, order.numpy())


@pytest.mark.parametrize("k, n, block_size", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_fp4_bytes_match_bitsandbytes(bnb, k, n, block_size, double_quant):
    w = kernel(k, n)
    packed, qs = bnb.functional.quantize_4bit(
        torch_t(bnb, w),
        blocksize=block_size,
        compress_statistics=double_quant,
        quant_type="fp4",
    )
    ours = quantize(w, "fp4", block_size, double_quant, scale_search=False)
    assert ours.quant_type == "fp4"
    np.testing.assert_array_equal(ours.packed, packed.numpy().reshape(-1))
    if not double_quant:
        np.testing.assert_array_equal(ours.absmax, qs.absmax.numpy())
        return
    np.testing.assert_allclose(
        ours.absmax_scale, qs.state2.absmax.numpy(), rtol=1e-6
    )
    assert ours.absmax_offset == pytest.approx(qs.offset.item(), rel=1e-6)
    # The 8-bit scale codes agree but for float32 rounding of the mean, as
    # for NF4 (tests/interop/test_bitsandbytes.py). One block is its own
    # mean: both give the scale 0 + offset, with different codes for 0.
    if ours.num_blocks > 1:
        assert np.mean(ours.absmax == qs.absmax.numpy()) >= 0.99


@pytest.mark.parametrize("k, n, block_size", [(37, 19, 32), (64, 40, 64)])
@pytest.mark.parametrize("scale_search", [False, True])
def test_bitsandbytes_dequantizes_our_fp4_exactly(
    bnb, k, n, block_size, scale_search
):
    from keras_qlora.interop import to_bitsandbytes

    state = quantize(kernel(k, n), "fp4", block_size, True, scale_search)
    sd = to_bitsandbytes(state)
    torch = bnb.torch
    quant = {
        key[len("weight.") :]: torch.from_numpy(value)
        for key, value in sd.items()
        if key.startswith("weight.")
    }
    qs = bnb.functional.QuantState.from_dict(quant, device=torch.device("cpu"))
    theirs = bnb.functional.dequantize_4bit(
        torch.from_numpy(sd["weight"]), qs
    ).numpy()
    np.testing.assert_array_equal(dequantize(state), theirs.T)


def test_fp4_rounds_zero_tiny_values_and_padding_as_bitsandbytes():
    # 0.0 -> code 0; a tiny positive value -> code 8 (the second zero in
    # bitsandbytes' sorted order); a tiny negative one -> code 0; an odd
    # tail pads with code 0.
    w = np.array([[1.0], [0.0], [1e-9], [-1e-9], [0.5]], np.float32)
    state = quantize(w, "fp4", 32, double_quant=False, scale_search=False)
    assert state.packed.tolist() == [0x30, 0x80, 0x50]
    np.testing.assert_array_equal(dequantize(state)[:, 0], [1, 0, 0, 0, 0.5])


def test_fp4_scale_search_lowers_the_error():
    w = kernel(256, 64, scale=1.0)
    plain = quantize(w, "fp4", scale_search=False)
    searched = quantize(w, "fp4", scale_search=True)
    err = [np.square(dequantize(s) - w).sum() for s in (plain, searched)]
    assert err[1] < err[0]


def test_fp4_state_round_trips_through_dict():
    state = quantize(kernel(70, 9), "fp4")
    back = NF4State.from_dict(state.to_dict())
    assert back.quant_type == "fp4"
    np.testing.assert_array_equal(dequantize(back), dequantize(state))
    # An NF4 state's dict is unchanged by the new field.
    assert "quant_type" not in quantize(kernel(70, 9)).to_dict()


# -- int8 ---------------------------------------------------------------------


@pytest.mark.parametrize("k, n", [(37, 19), (1, 1), (300, 7), (70, 33)])
@pytest.mark.parametrize("scale", [0.02, 30.0])
def test_int8_bytes_and_dequantization_match_bitsandbytes(bnb, k, n, scale):
    w = kernel(k, n, scale=scale)
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(torch_t(bnb, w))
    ours = quantize_int8(w)
    assert (ours.quant_type, ours.block_size, ours.shape) == ("int8", k, (k, n))
    np.testing.assert_array_equal(ours.packed.view(np.int8), cb.numpy().ravel())
    np.testing.assert_array_equal(ours.absmax, scb.numpy())
    theirs = bnb.functional.int8_vectorwise_dequant(cb, scb).numpy()
    np.testing.assert_array_equal(dequantize(ours), theirs.T)


def test_int8_matches_int8params_of_a_float16_linear(bnb):
    import bitsandbytes as bnb_root

    torch = bnb.torch
    torch.manual_seed(0)
    linear = torch.nn.Linear(70, 33).half()
    layer = bnb_root.nn.Linear8bitLt(70, 33, has_fp16_weights=False)
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")
    w = linear.weight.detach().float().numpy().T  # float16 values, [K, N]
    ours = quantize_int8(w)
    np.testing.assert_array_equal(
        ours.packed.view(np.int8), layer.weight.data.numpy().ravel()
    )
    np.testing.assert_array_equal(ours.absmax, layer.weight.SCB.numpy())


def test_int8_zero_rows_and_ties():
    w = np.zeros((4, 3), np.float32)
    w[:, 1] = [2.0, -1.0, 0.5, 0.0]
    state = quantize_int8(w)
    np.testing.assert_array_equal(state.absmax, [0.0, 2.0, 0.0])
    codes_ = state.packed.view(np.int8).reshape(3, 4)
    np.testing.assert_array_equal(codes_[0], 0)
    # 0.5 / 2 * 127 = 31.75 -> 32; -1 / 2 * 127 = -63.5 -> -64 (to even).
    np.testing.assert_array_equal(codes_[1], [127, -64, 32, 0])
    np.testing.assert_array_equal(dequantize(state)[:, 0], 0)


def test_int8_error_is_far_below_nf4():
    w = kernel(384, 384, scale=1.0)
    errors = {
        t: np.abs(dequantize(quantize(w, t)) - w).mean() for t in QUANT_TYPES
    }
    assert errors["int8"] < errors["nf4"] / 5
    assert errors["nf4"] < errors["fp4"]


def test_int8_state_round_trips_and_counts_bits():
    state = quantize(kernel(64, 10), "int8")
    assert state.bits_per_weight == pytest.approx(8 + 32 / 64)
    back = NF4State.from_dict(state.to_dict())
    assert (back.quant_type, back.block_size) == ("int8", 64)
    np.testing.assert_array_equal(dequantize(back), dequantize(state))


# -- bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
    "value, error, match",
    [
        ("int4", ValueError, r"quant_type must be one of \('nf4', 'fp4', "),
        ("NF4", ValueError, r"Received: quant_type='NF4'"),
        (8, TypeError, r"quant_type must be one of .*Received: quant_type=8"),
        (None, TypeError, r"Received: quant_type=None"),
    ],
)
def test_quantize_refuses_unknown_formats(value, error, match):
    with pytest.raises(error, match=match):
        quantize(kernel(8, 8), value)


def test_quantize_4bit_refuses_int8():
    with pytest.raises(ValueError, match=r"a 4-bit format.*'int8'"):
        quantize_4bit(kernel(8, 8), "int8")


def test_int8_checks_the_4bit_settings_it_does_not_use():
    with pytest.raises(ValueError, match="block_size must be one of"):
        quantize(kernel(8, 8), "int8", block_size=48)
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        quantize(kernel(8, 8), "int8", double_quant="no")


def test_int8_quantizer_refuses_bad_kernels():
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int8(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(TypeError, match="floating-point kernel"):
        quantize_int8(np.ones((2, 2), np.int32))


def _int8_fields(**changes):
    fields = dict(
        packed=np.zeros(12, np.uint8),
        absmax=np.ones(3, np.float32),
        shape=(4, 3),
        block_size=4,
        quant_type="int8",
    )
    fields.update(changes)
    return fields


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"block_size": 64}, r"block_size must be 4\. Received: block_size=64"),
        ({"packed": np.zeros(6, np.uint8)}, r"packed must have .*\(12,\)"),
        ({"absmax": np.ones(3, np.uint8)}, r"absmax must have dtype float32"),
        ({"absmax": np.ones(4, np.float32)}, r"absmax must have .*\(3,\)"),
        (
            {"absmax_scale": np.ones(1, np.float32), "absmax_offset": 0.0},
            r"no double quantization",
        ),
        ({"absmax": np.array([1, np.inf, 1], np.float32)}, r"NaN or Inf"),
        ({"quant_type": "int4"}, r"quant_type must be one of"),
    ],
)
def test_int8_state_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        NF4State(**_int8_fields(**changes))
