"""NF4 quantize / dequantize, packing, double quant and NF4State."""

import numpy as np
import pytest

from keras_qlora.quantizers import NF4_CODE
from keras_qlora.quantizers import NF4State
from keras_qlora.quantizers import dequantize_nf4
from keras_qlora.quantizers import double_quantize_absmax
from keras_qlora.quantizers import dynamic_map
from keras_qlora.quantizers import pack_nibbles
from keras_qlora.quantizers import quantize_nf4
from keras_qlora.quantizers import unpack_nibbles


def gaussian(shape, seed=0, std=0.05):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * std).astype(np.float32)


def rel_error(approx, exact):
    return np.linalg.norm(approx - exact) / np.linalg.norm(exact)


def block_sse(kernel, state):
    """Squared error of every quantization block (in bitsandbytes order)."""
    diff = (dequantize_nf4(state) - kernel).T.reshape(-1)  # [N, K] flat
    bs = state.block_size
    padded = np.zeros(state.num_blocks * bs, np.float64)
    padded[: diff.size] = diff
    return np.square(padded.reshape(-1, bs)).sum(axis=1)


# -- round trip -------------------------------------------------------------


@pytest.mark.parametrize("scale_search", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_bound(scale_search, double_quant):
    kernel = gaussian((256, 96))
    state = quantize_nf4(kernel, 64, double_quant, scale_search)
    out = dequantize_nf4(state)
    assert out.shape == kernel.shape and out.dtype == np.float32
    assert rel_error(out, kernel) < 0.11


def test_scale_search_lowers_total_error():
    kernel = gaussian((256, 128), seed=1)
    plain = dequantize_nf4(quantize_nf4(kernel, scale_search=False))
    searched = dequantize_nf4(quantize_nf4(kernel, scale_search=True))
    assert rel_error(searched, kernel) < 0.97 * rel_error(plain, kernel)


@pytest.mark.parametrize("block_size", [32, 64, 256])
def test_scale_search_never_increases_a_block_error(block_size):
    kernel = gaussian((77, 45), seed=2)  # partial last block
    plain = quantize_nf4(kernel, block_size, False, scale_search=False)
    searched = quantize_nf4(kernel, block_size, False, scale_search=True)
    before, after = block_sse(kernel, plain), block_sse(kernel, searched)
    assert np.all(after <= before * (1 + 1e-6))
    assert np.sum(after < before) > 0  # and it does help somewhere


@pytest.mark.parametrize(
    "shape, block_size",
    [((37, 19), 32), ((77, 3), 256), ((5, 13), 64), ((200, 1), 128)],
)
@pytest.mark.parametrize("double_quant", [False, True])
def test_odd_and_partial_block_shapes(shape, block_size, double_quant):
    kernel = gaussian(shape, seed=3)
    state = quantize_nf4(kernel, block_size, double_quant)
    assert state.shape == shape
    assert state.packed.shape == ((shape[0] * shape[1] + 1) // 2,)
    assert state.num_blocks == -(-shape[0] * shape[1] // block_size)
    assert rel_error(dequantize_nf4(state), kernel) < 0.11


@pytest.mark.parametrize("double_quant", [False, True])
def test_single_element_is_exact(double_quant):
    kernel = np.array([[-0.37]], np.float32)
    state = quantize_nf4(kernel, 64, double_quant)
    assert state.packed.tolist() == [0x07]  # code -1.0, padded with 0.0
    np.testing.assert_array_equal(dequantize_nf4(state), kernel)


@pytest.mark.parametrize("double_quant", [False, True])
def test_zero_kernel_and_zero_partial_block(double_quant):
    zeros = np.zeros((7, 9), np.float32)
    out = dequantize_nf4(quantize_nf4(zeros, 32, double_quant))
    np.testing.assert_array_equal(out, zeros)
    kernel = gaussian((64, 1))
    kernel = np.concatenate([kernel, np.zeros((8, 1), np.float32)])
    out = dequantize_nf4(quantize_nf4(kernel, 64, double_quant))
    np.testing.assert_array_equal(out[64:], 0.0)  # the zero tail block


def test_maximum_of_each_block_is_exact_without_double_quant():
    kernel = gaussian((64, 8), seed=4)
    out = dequantize_nf4(quantize_nf4(kernel, 64, False, False))
    # Block b is column b of the kernel (K = block size): its absmax element
    # maps to code +-1 and comes back bit-exact.
    for col in range(8):
        i = np.argmax(np.abs(kernel[:, col]))
        assert out[i, col] == kernel[i, col]


def test_accepts_float16_and_tensor_like():
    kernel = gaussian((32, 4), seed=5)

    class FakeTensor:
        def numpy(self):
            return kernel

    a = quantize_nf4(kernel.astype(np.float16), 32, scale_search=False)
    b = quantize_nf4(FakeTensor(), 32, scale_search=False)
    assert rel_error(dequantize_nf4(a), kernel) < 0.11
    np.testing.assert_array_equal(
        dequantize_nf4(b), dequantize_nf4(quantize_nf4(kernel, 32, True, False))
    )


# -- packing ----------------------------------------------------------------


def test_pack_high_nibble_first_by_hand():
    packed = pack_nibbles(np.array([1, 2, 3, 4, 5]))
    assert packed.dtype == np.uint8
    assert packed.tolist() == [0x12, 0x34, 0x57]  # odd tail padded with 7
    assert unpack_nibbles(packed, 5).tolist() == [1, 2, 3, 4, 5]
    assert unpack_nibbles(packed, 6).tolist() == [1, 2, 3, 4, 5, 7]


def test_quantized_bytes_by_hand():
    # Kernel [K=2, N=2]; bytes follow W^T flattened: k00, k10, k01, k11.
    kernel = np.array([[1.0, 0.0], [-1.0, 0.5]], np.float32)
    state = quantize_nf4(kernel, 32, double_quant=False, scale_search=False)
    # 1.0 -> 15, -1.0 -> 0, 0.0 -> 7, 0.5 -> 12 (0.4407 is nearer than 0.5626)
    assert state.packed.tolist() == [0xF0, 0x7C]
    assert state.absmax.tolist() == [1.0]
    np.testing.assert_array_equal(
        dequantize_nf4(state), [[1.0, 0.0], [-1.0, NF4_CODE[12]]]
    )


@pytest.mark.parametrize("length", [0, 1, 2, 3, 63, 64, 1001])
def test_pack_unpack_round_trip(length):
    idx = np.random.default_rng(length).integers(0, 16, length, np.uint8)
    packed = pack_nibbles(idx)
    assert packed.shape == ((length + 1) // 2,)
    np.testing.assert_array_equal(unpack_nibbles(packed, length), idx)


def test_pack_rejects_values_over_15():
    with pytest.raises(ValueError, match=r"values in \[0, 15\].*max=16"):
        pack_nibbles(np.array([3, 16]))


@pytest.mark.parametrize("count", [-1, 7])
def test_unpack_rejects_bad_count(count):
    with pytest.raises(ValueError, match=f"count={count}"):
        unpack_nibbles(np.zeros(3, np.uint8), count)


# -- double quantization ----------------------------------------------------


def test_double_quant_reconstructs_absmax():
    kernel = gaussian((512, 256), seed=6)
    raw = quantize_nf4(kernel, 64, False, False).absmax
    state = quantize_nf4(kernel, 64, True, False)
    assert state.absmax.dtype == np.uint8
    assert state.absmax_scale.shape == (-(-raw.size // 256),)
    assert state.absmax_offset == pytest.approx(raw.mean(), rel=1e-6)
    err = np.abs(state.block_absmax() - raw)
    assert err.max() < 0.01 * raw.max()
    assert np.mean(err / raw) < 0.005


def test_double_quantize_absmax_formula():
    absmax = np.abs(gaussian((600,), seed=7)) + 0.01
    q, scale, offset = double_quantize_absmax(absmax)
    assert q.dtype == np.uint8 and q.shape == (600,)
    assert scale.dtype == np.float32 and scale.shape == (3,)
    centered = absmax - np.float32(offset)
    for i in range(3):
        part = centered[256 * i : 256 * (i + 1)]
        assert scale[i] == np.abs(part).max()
        # Every code is the nearest entry of the dynamic map.
        normed = part / scale[i]
        got = np.abs(dynamic_map()[q[256 * i : 256 * (i + 1)]] - normed)
        best = np.abs(dynamic_map()[None, :] - normed[:, None]).min(axis=1)
        np.testing.assert_allclose(got, best, atol=1e-7)


def test_bits_per_weight_4096_square():
    k = n = 4096
    blocks = k * n // 64
    state = NF4State(
        packed=np.zeros(k * n // 2, np.uint8),
        absmax=np.zeros(blocks, np.uint8),
        shape=(k, n),
        block_size=64,
        absmax_scale=np.zeros(blocks // 256, np.float32),
        absmax_offset=0.0,
    )
    assert state.bits_per_weight == pytest.approx(4.127, abs=5e-4)
    plain = NF4State(
        packed=state.packed, absmax=np.zeros(blocks, np.float32), shape=(k, n)
    )
    assert plain.bits_per_weight == pytest.approx(4.5)


def test_bits_per_weight_of_a_real_quantization():
    state = quantize_nf4(gaussian((256, 256)), 64, scale_search=False)
    assert state.bits_per_weight == pytest.approx(4.127, abs=2e-3)


# -- input validation -------------------------------------------------------


@pytest.mark.parametrize("block_size", [16, 48, 512])
def test_block_size_not_allowed(block_size):
    with pytest.raises(ValueError, match=r"block_size must be one of \(32"):
        quantize_nf4(gaussian((8, 8)), block_size)


@pytest.mark.parametrize("block_size", [64.0, True, "64", None])
def test_block_size_wrong_type(block_size):
    # A wrong type is a TypeError, a wrong value a ValueError (one check).
    with pytest.raises(TypeError, match=r"block_size must be one of \(32"):
        quantize_nf4(gaussian((8, 8)), block_size)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_])
def test_non_float_kernel_is_type_error(dtype):
    with pytest.raises(TypeError, match="floating-point kernel.*dtype="):
        quantize_nf4(np.ones((4, 4), dtype))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_kernel_is_value_error(bad):
    kernel = gaussian((8, 8))
    kernel[3, 5] = bad
    with pytest.raises(ValueError, match="1 non-finite values"):
        quantize_nf4(kernel)


@pytest.mark.parametrize("shape", [(8,), (0, 4), (4, 0), (2, 3, 4), ()])
def test_kernel_must_be_non_empty_2d(shape):
    with pytest.raises(ValueError, match=r"non-empty 2-D kernel.*shape="):
        quantize_nf4(np.ones(shape, np.float32))


def test_dequantize_rejects_non_state():
    with pytest.raises(TypeError, match="expects an NF4State"):
        dequantize_nf4({"packed": np.zeros(1, np.uint8)})


# -- NF4State ---------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip(double_quant):
    state = quantize_nf4(gaussian((37, 19)), 32, double_quant)
    config = state.to_dict()
    assert config["shape"] == [37, 19] and config["block_size"] == 32
    assert ("absmax_scale" in config) == double_quant
    again = NF4State.from_dict(config)
    assert again.shape == state.shape
    assert again.block_size == state.block_size
    assert again.double_quant == double_quant
    assert again.absmax_offset == state.absmax_offset
    np.testing.assert_array_equal(again.packed, state.packed)
    np.testing.assert_array_equal(again.absmax, state.absmax)
    np.testing.assert_array_equal(dequantize_nf4(again), dequantize_nf4(state))


def _config(**changes):
    config = quantize_nf4(gaussian((16, 8)), 32).to_dict()
    config.update(changes)
    return config


def test_state_from_dict_validation():
    with pytest.raises(TypeError, match="expects a dict"):
        NF4State.from_dict([1, 2])
    config = _config()
    del config["packed"]
    with pytest.raises(ValueError, match=r"missing keys \['packed'\]"):
        NF4State.from_dict(config)
    bad_packed = _config(packed=np.zeros(64, np.int32))
    with pytest.raises(ValueError, match=r"packed must have dtype uint8"):
        NF4State.from_dict(bad_packed)
    with pytest.raises(ValueError, match=r"absmax must have .*shape \(4,\)"):
        NF4State.from_dict(_config(absmax=np.zeros(5, np.uint8)))
    with pytest.raises(ValueError, match="both absmax_scale and absmax_off"):
        NF4State.from_dict(_config(absmax_offset=None))
    with pytest.raises(ValueError, match="block_size must be one of"):
        NF4State.from_dict(_config(block_size=100))
    with pytest.raises(ValueError, match="two positive sizes"):
        NF4State.from_dict(_config(shape=[16, 8, 1]))
    with pytest.raises(ValueError, match="two positive sizes"):
        NF4State.from_dict(_config(shape=[0, 8]))


def test_state_requires_numpy_arrays():
    config = _config()
    config["packed"] = config["packed"].tolist()
    with pytest.raises(TypeError, match="packed must be a numpy array"):
        NF4State(
            packed=config["packed"],
            absmax=config["absmax"],
            shape=(16, 8),
            block_size=32,
            absmax_scale=config["absmax_scale"],
            absmax_offset=config["absmax_offset"],
        )
