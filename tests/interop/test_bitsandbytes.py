"""bitsandbytes compatibility: same bytes, same dequantized weights.

bitsandbytes quantizes a torch Linear weight `[N, K]`; we quantize the Keras
kernel `[K, N]`, so every comparison feeds it `W.T`.
"""

import json

import numpy as np
import pytest

from keras_qlora.interop import from_bitsandbytes
from keras_qlora.interop import to_bitsandbytes
from keras_qlora.quantizers import NF4_CODE
from keras_qlora.quantizers import NF4State
from keras_qlora.quantizers import dequantize
from keras_qlora.quantizers import dequantize_nf4
from keras_qlora.quantizers import dynamic_map
from keras_qlora.quantizers import quantize_nf4

# (K, N, block size): odd sizes, partial last blocks, > 256 blocks (so the
# nested scales have more than one block), and one element.
SHAPES = [
    (37, 19, 32),
    (77, 3, 256),
    (1, 1, 64),
    (130, 70, 64),
    (300, 231, 32),
    (257, 129, 128),
]
PREFIX = "weight."


def kernel(k, n, seed=0):
    rng = np.random.default_rng(seed + 17 * k + n)
    return (rng.standard_normal((k, n)) * 0.02).astype(np.float32)


def bnb_quantize(bnb, w, block_size, double_quant=True):
    torch_w = bnb.torch.from_numpy(np.ascontiguousarray(w.T))  # [N, K]
    return bnb.functional.quantize_4bit(
        torch_w,
        blocksize=block_size,
        compress_statistics=double_quant,
        quant_type="nf4",
    )


def bnb_dequantize(bnb, state_dict):
    """bitsandbytes' own reading of our state_dict, dequantized: [N, K]."""
    torch = bnb.torch
    quant = {
        key[len(PREFIX) :]: torch.from_numpy(value)
        for key, value in state_dict.items()
        if key.startswith(PREFIX)
    }
    qs = bnb.functional.QuantState.from_dict(quant, device=torch.device("cpu"))
    packed = torch.from_numpy(state_dict["weight"])
    return bnb.functional.dequantize_4bit(packed, qs).numpy()


def bnb_state_dict(packed, quant_state):
    """What a bitsandbytes Linear4bit saves: weight + packed quant state."""
    out = {"weight": packed}
    for key, value in quant_state.as_dict(packed=True).items():
        out[PREFIX + key] = value
    return out


# -- our bytes are bitsandbytes' bytes --------------------------------------


@pytest.mark.parametrize("k, n, block_size", SHAPES)
def test_packed_bytes_and_nested_state_match(bnb, k, n, block_size):
    w = kernel(k, n)
    packed, qs = bnb_quantize(bnb, w, block_size)
    ours = quantize_nf4(w, block_size, double_quant=True, scale_search=False)

    np.testing.assert_array_equal(ours.packed, packed.numpy().reshape(-1))
    assert ours.absmax_offset == pytest.approx(qs.offset.item(), rel=1e-6)
    np.testing.assert_allclose(
        ours.absmax_scale, qs.state2.absmax.numpy(), rtol=1e-6
    )
    _check_absmax_codes(w, block_size, ours, qs)


def _check_absmax_codes(w, block_size, ours, qs):
    """uint8 absmax codes: equal, or adjacent with ours the nearer one.

    bitsandbytes' CPU kernel finds the code through an approximate lookup
    table; ours (like its CUDA kernel) is the exact nearest code.
    """
    theirs = qs.absmax.numpy()
    mine = ours.absmax
    table = dynamic_map().astype(np.float64)
    raw = quantize_nf4(w, block_size, False, False).absmax  # true absmax
    scale = np.repeat(ours.absmax_scale, 256)[: raw.size].astype(np.float64)
    live = scale > 0
    # Where a nested block's scale is 0 every code decodes to the offset.
    np.testing.assert_array_equal(
        ours.block_absmax()[~live],
        np.full((~live).sum(), np.float32(ours.absmax_offset)),
    )
    mine, theirs, raw, scale = mine[live], theirs[live], raw[live], scale[live]
    if mine.size == 0:
        return
    assert np.mean(mine == theirs) >= 0.99
    differ = mine != theirs
    diff = mine[differ].astype(int) - theirs[differ].astype(int)
    assert np.all(np.abs(diff) == 1)
    target = (raw[differ] - ours.absmax_offset) / scale[differ]
    mine_err = np.abs(table[mine[differ]] - target)
    their_err = np.abs(table[theirs[differ]] - target)
    assert np.all(mine_err <= their_err + 1e-7)


@pytest.mark.parametrize("k, n, block_size", SHAPES[:3])
def test_packed_bytes_match_without_double_quant(bnb, k, n, block_size):
    w = kernel(k, n, seed=1)
    packed, qs = bnb_quantize(bnb, w, block_size, double_quant=False)
    ours = quantize_nf4(w, block_size, double_quant=False, scale_search=False)
    np.testing.assert_array_equal(ours.packed, packed.numpy().reshape(-1))
    np.testing.assert_array_equal(ours.absmax, qs.absmax.numpy())


# -- bitsandbytes reads what we write ---------------------------------------


@pytest.mark.parametrize("k, n, block_size", SHAPES)
@pytest.mark.parametrize("scale_search", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_dequantizes_our_state_exactly(
    bnb, k, n, block_size, scale_search, double_quant
):
    state = quantize_nf4(kernel(k, n), block_size, double_quant, scale_search)
    state_dict = to_bitsandbytes(state)
    theirs = bnb_dequantize(bnb, state_dict)
    assert theirs.shape == (n, k) and theirs.dtype == np.float32
    assert np.array_equal(theirs, dequantize_nf4(state).T)


def test_to_bitsandbytes_layout():
    state = quantize_nf4(kernel(37, 19), 32, double_quant=True)
    sd = to_bitsandbytes(state)
    assert list(sd) == [
        "weight",
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    ]
    assert sd["weight"].dtype == np.uint8
    assert sd["weight"].shape == ((37 * 19 + 1) // 2, 1)
    assert sd["weight.absmax"].dtype == np.uint8
    np.testing.assert_array_equal(sd["weight.quant_map"], NF4_CODE)
    np.testing.assert_array_equal(sd["weight.nested_quant_map"], dynamic_map())
    meta = json.loads(sd["weight.quant_state.bitsandbytes__nf4"].tobytes())
    assert meta == {
        "quant_type": "nf4",
        "blocksize": 32,
        "dtype": "float32",
        "shape": [19, 37],
        "nested_blocksize": 256,
        "nested_dtype": "float32",
        "nested_offset": state.absmax_offset,
    }
    # The arrays are copies: changing them leaves the state alone.
    sd["weight"][0] ^= 0xFF
    assert sd["weight"][0, 0] != state.packed[0]


def test_to_bitsandbytes_without_double_quant_and_custom_prefix():
    state = quantize_nf4(kernel(16, 8), 64, double_quant=False)
    sd = to_bitsandbytes(state, prefix="lm.up_proj.weight")
    assert sorted(sd) == [
        "lm.up_proj.weight",
        "lm.up_proj.weight.absmax",
        "lm.up_proj.weight.quant_map",
        "lm.up_proj.weight.quant_state.bitsandbytes__nf4",
    ]
    assert sd["lm.up_proj.weight.absmax"].dtype == np.float32
    raw = sd["lm.up_proj.weight.quant_state.bitsandbytes__nf4"].tobytes()
    assert json.loads(raw.decode("utf-8")) == {
        "quant_type": "nf4",
        "blocksize": 64,
        "dtype": "float32",
        "shape": [8, 16],
    }
    back = from_bitsandbytes(sd, prefix="lm.up_proj.weight")
    np.testing.assert_array_equal(dequantize_nf4(back), dequantize_nf4(state))


def test_to_bitsandbytes_from_layer():
    import keras

    from keras_qlora.layers import QLoRADense

    dense = keras.layers.Dense(8)
    dense.build((None, 24))
    layer = QLoRADense.from_layer(dense, rank=2, block_size=32)
    sd = to_bitsandbytes(layer)
    expected = to_bitsandbytes(layer.nf4_state())
    assert sd.keys() == expected.keys()
    for key in sd:
        np.testing.assert_array_equal(sd[key], expected[key])


def test_to_bitsandbytes_rejects_other_objects():
    with pytest.raises(TypeError, match="NF4State or a built QLoRADense"):
        to_bitsandbytes({"packed": 1})
    state = quantize_nf4(kernel(4, 4), 32)
    with pytest.raises(ValueError, match="prefix must be the non-empty"):
        to_bitsandbytes(state, prefix="")


# -- we read what bitsandbytes writes ---------------------------------------


@pytest.mark.parametrize("k, n, block_size", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bitsandbytes_reproduces_their_weight(
    bnb, k, n, block_size, double_quant
):
    w = kernel(k, n, seed=2)
    packed, qs = bnb_quantize(bnb, w, block_size, double_quant)
    theirs = bnb.functional.dequantize_4bit(packed, qs).numpy()  # [N, K]
    state = from_bitsandbytes(bnb_state_dict(packed, qs))
    assert state.shape == (k, n)
    assert state.double_quant == double_quant
    assert np.array_equal(dequantize_nf4(state), theirs.T)


def test_from_bitsandbytes_numpy_round_trip():
    for double_quant in (False, True):
        state = quantize_nf4(kernel(37, 19), 32, double_quant)
        back = from_bitsandbytes(to_bitsandbytes(state))
        assert back.shape == state.shape
        assert back.block_size == state.block_size
        assert back.absmax_offset == state.absmax_offset
        np.testing.assert_array_equal(back.packed, state.packed)
        np.testing.assert_array_equal(back.absmax, state.absmax)


# -- bad input --------------------------------------------------------------


def good_state_dict(double_quant=True):
    state = quantize_nf4(kernel(37, 19), 32, double_quant)
    return to_bitsandbytes(state)


def with_meta(state_dict, **changes):
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(state_dict[key].tobytes())
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not _DROP}
    state_dict[key] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return state_dict


_DROP = object()


def test_from_bitsandbytes_rejects_non_mapping():
    with pytest.raises(TypeError, match="expects a state_dict mapping"):
        from_bitsandbytes([("weight", 1)])


def test_from_bitsandbytes_missing_quant_state():
    sd = good_state_dict()
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(
        ValueError,
        match=r"exactly one key 'weight.quant_state.bitsandbytes__nf4'.*"
        r"Received: none; keys under 'weight': \['weight', 'weight.absmax'",
    ):
        from_bitsandbytes(sd)


def test_from_bitsandbytes_wrong_prefix():
    with pytest.raises(ValueError, match="'lm.weight.quant_state.bitsandb"):
        from_bitsandbytes(good_state_dict(), prefix="lm.weight")


def test_from_bitsandbytes_rejects_other_formats():
    sd = good_state_dict()
    blob = sd.pop("weight.quant_state.bitsandbytes__nf4")
    sd["weight.quant_state.bitsandbytes__int4"] = blob
    with pytest.raises(
        ValueError, match=r"holds a 'int4' weight; the 4-bit formats are"
    ):
        from_bitsandbytes(sd)
    # The key says nf4, the JSON says fp4: refused, not guessed.
    sd = with_meta(good_state_dict(), quant_type="fp4")
    with pytest.raises(
        ValueError, match=r"'quant_type'.*one of \('nf4',\)\. .*'fp4'"
    ):
        from_bitsandbytes(sd)


def test_from_bitsandbytes_fp4_state_from_bitsandbytes(bnb):
    # K = 64: bitsandbytes 0.50.2's CPU dequantize_4bit misplaces block
    # scales for some even K that blocks do not divide (K = 16, 32, 96),
    # for NF4 and FP4 alike; its bytes are right there too.
    w = kernel(64, 8)
    packed, qs = bnb.functional.quantize_4bit(
        bnb.torch.from_numpy(w.T.copy()), blocksize=64, quant_type="fp4"
    )
    state = from_bitsandbytes(bnb_state_dict(packed, qs))
    assert state.quant_type == "fp4"
    theirs = bnb.functional.dequantize_4bit(packed, qs).numpy()
    np.testing.assert_array_equal(dequantize(state), theirs.T)


@pytest.mark.parametrize("block_size", [16, 512, 4096, 64.0, "64"])
def test_from_bitsandbytes_rejects_block_size(block_size):
    sd = with_meta(good_state_dict(), blocksize=block_size)
    with pytest.raises(
        ValueError,
        match=r"field 'blocksize' of 'weight.quant_state.bitsandbytes__nf4' "
        r"must be one of \(32, 64, 128, 256\)\. Received: blocksize=",
    ):
        from_bitsandbytes(sd)


def test_from_bitsandbytes_bitsandbytes_block_4096(bnb):
    packed, qs = bnb_quantize(bnb, kernel(128, 64), 4096)
    with pytest.raises(ValueError, match="Received: blocksize=4096"):
        from_bitsandbytes(bnb_state_dict(packed, qs))


def test_from_bitsandbytes_rejects_bad_meta_fields():
    with pytest.raises(ValueError, match=r"field 'dtype'.*Received: dtype="):
        from_bitsandbytes(with_meta(good_state_dict(), dtype="int8"))
    with pytest.raises(ValueError, match="'shape'.*two positive ints"):
        from_bitsandbytes(with_meta(good_state_dict(), shape=[19, 37, 1]))
    with pytest.raises(ValueError, match=r"lacks fields \['shape'\]"):
        from_bitsandbytes(with_meta(good_state_dict(), shape=_DROP))
    with pytest.raises(ValueError, match=r"'nested_blocksize'.*\(256,\)"):
        from_bitsandbytes(with_meta(good_state_dict(), nested_blocksize=128))
    with pytest.raises(ValueError, match="'nested_offset'.*finite in float32"):
        from_bitsandbytes(with_meta(good_state_dict(), nested_offset="x"))
    sd = good_state_dict()
    sd["weight.quant_state.bitsandbytes__nf4"] = np.array([1, 2], np.uint8)
    with pytest.raises(ValueError, match="bytes of a UTF-8 JSON dict"):
        from_bitsandbytes(sd)


def test_from_bitsandbytes_rejects_wrong_code_tables():
    sd = good_state_dict()
    sd["weight.quant_map"] = sd["weight.quant_map"] * 2
    with pytest.raises(ValueError, match="'weight.quant_map' must be the NF4"):
        from_bitsandbytes(sd)
    sd = good_state_dict()
    sd["weight.nested_quant_map"] = np.linspace(-1, 1, 256, dtype=np.float32)
    with pytest.raises(
        ValueError, match="'weight.nested_quant_map' must be the 8-bit dynamic"
    ):
        from_bitsandbytes(sd)
    sd = good_state_dict()
    sd["weight.quant_map"] = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match=r"float32 with shape \[16\]"):
        from_bitsandbytes(sd)


def test_from_bitsandbytes_rejects_bad_arrays():
    sd = good_state_dict()
    sd["weight"] = sd["weight"][:-1]
    with pytest.raises(ValueError, match=r"'weight' must hold .* = 352 bytes"):
        from_bitsandbytes(sd)
    sd = good_state_dict()
    sd["weight"] = sd["weight"].astype(np.int8)
    with pytest.raises(ValueError, match="'weight' must be uint8.*int8"):
        from_bitsandbytes(sd)
    sd = good_state_dict()
    sd["weight.absmax"] = sd["weight.absmax"].astype(np.float32)
    with pytest.raises(ValueError, match=r"'weight.absmax' must be uint8 "):
        from_bitsandbytes(sd)
    sd = good_state_dict(double_quant=False)
    sd["weight.absmax"][0] = np.nan
    with pytest.raises(ValueError, match="'weight.absmax' must be finite"):
        from_bitsandbytes(sd)
    sd = good_state_dict()
    sd["weight.nested_absmax"] = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match=r"nested_absmax' must be float32 w"):
        from_bitsandbytes(sd)
    sd = good_state_dict()
    sd["weight.absmax"] = ["a"] * 22
    sd["weight.absmax"] = np.array(sd["weight.absmax"], dtype=object)
    with pytest.raises(TypeError, match="'weight.absmax' must be an array"):
        from_bitsandbytes(sd)


def test_from_bitsandbytes_missing_and_inconsistent_keys():
    sd = good_state_dict()
    del sd["weight.absmax"]
    with pytest.raises(ValueError, match="missing key 'weight.absmax'"):
        from_bitsandbytes(sd)
    sd = good_state_dict()
    del sd["weight.nested_absmax"]
    with pytest.raises(ValueError, match="double-quantized weight needs keys"):
        from_bitsandbytes(sd)
    sd = good_state_dict(double_quant=False)
    sd["weight.nested_absmax"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match="double-quantized weight needs keys"):
        from_bitsandbytes(sd)


def test_from_bitsandbytes_accepts_torch_tensors_and_ignores_others(bnb):
    state = quantize_nf4(kernel(37, 19), 32)
    sd = {
        "model.w.weight" if key == "weight" else "model.w." + key: value
        for key, value in to_bitsandbytes(state).items()
    }
    sd = {key: bnb.torch.from_numpy(value) for key, value in sd.items()}
    sd["model.other.weight"] = bnb.torch.zeros(3)
    back = from_bitsandbytes(sd, prefix="model.w.weight")
    assert isinstance(back, NF4State)
    np.testing.assert_array_equal(dequantize_nf4(back), dequantize_nf4(state))
    sd["model.w.weight.absmax"] = sd["model.w.weight.absmax"].to(
        bnb.torch.bfloat16
    )
    with pytest.raises(TypeError, match="cannot read 'model.w.weight.absmax'"):
        from_bitsandbytes(sd, prefix="model.w.weight")
