"""Whole models <-> bitsandbytes state dicts.

The reference for every layout is keras_hub's own Hugging Face converter
(see interop_helpers): a float backbone given bitsandbytes' dequantized
weights through it must equal, kernel for kernel, a QLoRA model loaded with
`from_bitsandbytes_model`.

bitsandbytes 0.50.2's native CPU `dequantize_4bit` (used for an even
`in_features`) disagrees with its own generic implementation when
`in_features` is not a multiple of the block size (e.g. [32, 32] weights
with blocks of 64), so the models here use blocks of 32 with widths that
are multiples of 32.
"""

import json

import numpy as np
import pytest
from interop_helpers import clone
from interop_helpers import dequantized_kernel
from interop_helpers import float_layers
from interop_helpers import hf_linear_weights
from interop_helpers import output
from interop_helpers import port_hf_weights
from interop_helpers import qlora
from interop_helpers import tiny_bert
from interop_helpers import tiny_gpt2

import keras_qlora
from keras_qlora.interop import from_bitsandbytes_model
from keras_qlora.interop import to_bitsandbytes
from keras_qlora.interop import to_bitsandbytes_model
from keras_qlora.quantizers import dequantize_nf4
from keras_qlora.quantizers import quantize_nf4

ROOTS = {"bert": "bert.", "gpt2": "transformer."}
BUILD = {"bert": tiny_bert, "gpt2": tiny_gpt2}
QUANT_STATE = ".weight.quant_state.bitsandbytes__nf4"


def bnb_model_state(bnb, weights, root, double_quant, block_size=32):
    """What a transformers model quantized by bitsandbytes saves for its
    linears; also returns bitsandbytes' dequantized weights."""
    torch = bnb.torch
    state_dict, dequantized = {}, {}
    for module, (weight, bias) in weights.items():
        packed, qs = bnb.functional.quantize_4bit(
            torch.from_numpy(weight),
            blocksize=block_size,
            compress_statistics=double_quant,
            quant_type="nf4",
        )
        key = f"{root}{module}.weight"
        state_dict[key] = packed
        for name, value in qs.as_dict(packed=True).items():
            state_dict[f"{key}.{name}"] = value
        state_dict[f"{root}{module}.bias"] = torch.from_numpy(bias)
        deq = bnb.functional.dequantize_4bit(packed, qs).numpy()
        dequantized[module] = (deq, bias)
    return state_dict, dequantized


def bnb_dequantize(bnb, state_dict, key):
    """bitsandbytes' reading of our entries for weight `key`: [out, in]."""
    torch = bnb.torch
    quant = {
        k[len(key) + 1 :]: torch.from_numpy(v)
        for k, v in state_dict.items()
        if k.startswith(key + ".")
    }
    qs = bnb.functional.QuantState.from_dict(quant, device=torch.device("cpu"))
    packed = torch.from_numpy(state_dict[key])
    return bnb.functional.dequantize_4bit(packed, qs).numpy()


def numpy_state(weights, root, double_quant, block_size=32):
    """A bitsandbytes-format state dict made with our quantizer (no torch)."""
    out = {}
    for module, (weight, bias) in weights.items():
        state = quantize_nf4(weight.T, block_size, double_quant, False)
        out.update(to_bitsandbytes(state, prefix=f"{root}{module}.weight"))
        out[f"{root}{module}.bias"] = bias
    return out


def assert_matches_converter(model, backbone, kind, dequantized):
    """Kernels and biases equal keras_hub's conversion of the same HF
    weights, exactly; outputs agree."""
    reference = clone(backbone)
    port_hf_weights(reference, kind, dequantized)
    floats = float_layers(reference)
    layers = model.qlora_layers()
    assert len(layers) == len(floats)
    for path, layer in layers.items():
        np.testing.assert_array_equal(
            dequantized_kernel(layer), floats[path].kernel.numpy(), path
        )
        np.testing.assert_array_equal(
            layer.bias.numpy(), floats[path].bias.numpy(), path
        )
    np.testing.assert_allclose(
        output(model, kind), output(reference, kind), atol=2e-5
    )


@pytest.fixture(scope="module")
def bert():
    return tiny_bert(seed=0)


# -- bitsandbytes -> our layers ----------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
def test_bert_from_bitsandbytes_reproduces_their_weights(
    bnb, bert, double_quant
):
    model = qlora(bert, block_size=32, double_quant=double_quant)
    weights = hf_linear_weights("bert")
    state_dict, dequantized = bnb_model_state(
        bnb, weights, "bert.", double_quant
    )
    loaded = from_bitsandbytes_model(model, state_dict, naming="hf-bert")
    assert sorted(loaded) == sorted(model.qlora_layers())
    assert len(loaded) == 2 * 6 + 1
    assert_matches_converter(model, bert, "bert", dequantized)

    # Back out: the same bytes bitsandbytes wrote, and it reads them back.
    ours = to_bitsandbytes_model(model, naming="hf-bert")
    assert ours.keys() == state_dict.keys()
    for key, value in state_dict.items():
        value = value.numpy()
        if key.endswith(QUANT_STATE):
            assert json.loads(ours[key].tobytes()) == json.loads(
                value.tobytes()
            )
        else:
            np.testing.assert_array_equal(
                ours[key].reshape(value.shape), value, key
            )
    for module, (deq, _) in dequantized.items():
        theirs = bnb_dequantize(bnb, ours, f"bert.{module}.weight")
        np.testing.assert_array_equal(theirs, deq)


def test_gpt2_fused_c_attn_from_bitsandbytes(bnb):
    backbone = tiny_gpt2(seed=1)
    model = qlora(backbone, block_size=32, double_quant=False)
    weights = hf_linear_weights("gpt2")
    # Double-quantized on the bitsandbytes side: the model (without double
    # quantization) takes the expanded block scales, exactly.
    state_dict, dequantized = bnb_model_state(
        bnb, weights, "transformer.", double_quant=True
    )
    from_bitsandbytes_model(model, state_dict, naming="hf-gpt2")
    assert_matches_converter(model, backbone, "gpt2", dequantized)
    ours = to_bitsandbytes_model(model, naming="hf-gpt2")
    for module, (deq, _) in dequantized.items():
        key = f"transformer.{module}.weight"
        assert f"{key}.nested_absmax" not in ours
        np.testing.assert_array_equal(bnb_dequantize(bnb, ours, key), deq)
    np.testing.assert_array_equal(
        ours["transformer.h.1.attn.c_attn.bias"],
        weights["h.1.attn.c_attn"][1],
    )


def test_gpt2_double_quant_c_attn_cuts_on_whole_groups(bnb):
    # hidden 128, blocks of 32: 512 blocks per piece, two nested groups.
    backbone = tiny_gpt2(seed=2, hidden=128, layers=1)
    model = qlora(backbone, block_size=32, double_quant=True)
    weights = hf_linear_weights("gpt2", hidden=128, layers=1)
    state_dict, dequantized = bnb_model_state(
        bnb, weights, "transformer.", double_quant=True
    )
    from_bitsandbytes_model(model, state_dict, naming="hf-gpt2")
    assert_matches_converter(model, backbone, "gpt2", dequantized)
    # One offset, whole groups: joined back double quantized, byte-exact.
    ours = to_bitsandbytes_model(model, naming="hf-gpt2")
    assert ours.keys() == state_dict.keys()
    key = "transformer.h.0.attn.c_attn.weight"
    for suffix in ("", ".absmax", ".nested_absmax"):
        np.testing.assert_array_equal(
            ours[key + suffix].reshape(-1),
            state_dict[key + suffix].numpy().reshape(-1),
        )


def test_gpt2_join_of_our_own_double_quant_pieces(bnb):
    model = qlora(tiny_gpt2(seed=3), block_size=32, double_quant=True)
    ours = to_bitsandbytes_model(model, naming="hf-gpt2")
    key = "transformer.h.0.attn.c_attn.weight"
    # Three offsets cannot share one double-quantized state: float32 block
    # scales, still exactly our weights.
    assert ours[f"{key}.absmax"].dtype == np.float32
    assert f"{key}.nested_absmax" not in ours
    assert "transformer.h.0.attn.c_proj.weight.nested_absmax" in ours
    layers = model.qlora_layers()
    block = "transformer_layer_0/self_attention"
    expected = np.concatenate(
        [
            dequantize_nf4(layers[f"{block}/{name}"].nf4_state())
            for name in ("query", "key", "value")
        ],
        axis=1,
    )
    np.testing.assert_array_equal(bnb_dequantize(bnb, ours, key), expected.T)
    # Our own output loads back into a model applied the same way: the
    # 4-bit codes are unchanged, the joined float32 block scales are double
    # quantized again, and a warning says by how much they moved.
    fresh = qlora(tiny_gpt2(seed=4), block_size=32, double_quant=True)
    with pytest.warns(UserWarning, match=r"6 weight\(s\) had float32 block"):
        from_bitsandbytes_model(fresh, ours, naming="hf-gpt2")
    for path, layer in fresh.qlora_layers().items():
        got, want = layer.nf4_state(), layers[path].nf4_state()
        np.testing.assert_array_equal(got.packed, want.packed)
        assert got.double_quant
        w = dequantize_nf4(want)
        np.testing.assert_allclose(
            dequantize_nf4(got), w, rtol=0, atol=0.01 * np.abs(w).max()
        )
        if not path.endswith(("query", "key", "value")):
            np.testing.assert_array_equal(dequantize_nf4(got), w)
    # A double-quantized one with groups across pieces cannot be cut.
    weights = hf_linear_weights("gpt2")
    nested = numpy_state(weights, "transformer.", double_quant=True)
    with pytest.raises(ValueError, match="groups straddle pieces"):
        from_bitsandbytes_model(model, nested, naming="hf-gpt2")


# -- without a naming table ---------------------------------------------------


def test_layer_paths_round_trip_between_models(bert):
    source = qlora(bert, block_size=32)
    target = qlora(bert, block_size=32)
    other = qlora(tiny_bert(seed=9), block_size=32)
    state_dict = to_bitsandbytes_model(source)
    assert (
        "transformer_layer_1.self_attention_layer.attention_output.weight"
        in state_dict
    )
    assert "pooled_dense.bias" in state_dict
    # Another model's weights first, so that loading visibly changes them.
    from_bitsandbytes_model(target, to_bitsandbytes_model(other))
    assert not np.allclose(output(target, "bert"), output(source, "bert"))
    from_bitsandbytes_model(target, state_dict)
    for path, layer in source.qlora_layers().items():
        other = target.qlora_layers()[path]
        np.testing.assert_array_equal(
            dequantized_kernel(other), dequantized_kernel(layer)
        )
        np.testing.assert_array_equal(other.bias.numpy(), layer.bias.numpy())
    np.testing.assert_array_equal(
        output(target, "bert"), output(source, "bert")
    )
    custom = to_bitsandbytes_model(source, module_prefix="model.")
    assert "model.pooled_dense.weight" in custom


# -- bad input ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_model(bert):
    return qlora(bert, block_size=32, double_quant=True)


@pytest.fixture(scope="module")
def good_state():
    return numpy_state(hf_linear_weights("bert"), "bert.", double_quant=True)


def nf4_snapshot(model):
    return {
        path: [v.numpy().copy() for v in layer.weights]
        for path, layer in model.qlora_layers().items()
    }


def assert_same(model, snapshot):
    for path, values in nf4_snapshot(model).items():
        for new, old in zip(values, snapshot[path], strict=True):
            np.testing.assert_array_equal(new, old, path)


def test_numpy_state_loads_and_prefix_is_detected(bert_model, good_state):
    bare = {k[len("bert.") :]: v for k, v in good_state.items()}
    from_bitsandbytes_model(bert_model, bare, naming="hf-bert")
    from_bitsandbytes_model(bert_model, good_state, naming="hf-bert")
    with pytest.raises(ValueError, match="lacks 26 key"):
        from_bitsandbytes_model(
            bert_model, good_state, naming="hf-bert", module_prefix=""
        )
    with pytest.raises(ValueError, match="module_prefix must be a string"):
        from_bitsandbytes_model(
            bert_model, good_state, naming="hf-bert", module_prefix="bert"
        )


def test_bad_input_leaves_the_model_unchanged(bert_model, good_state):
    from_bitsandbytes_model(bert_model, good_state, naming="hf-bert")
    before = nf4_snapshot(bert_model)
    last = "bert.pooler.dense.weight"

    def attempt(state_dict, match, error=ValueError, **kwargs):
        with pytest.raises(error, match=match):
            from_bitsandbytes_model(
                bert_model, state_dict, naming="hf-bert", **kwargs
            )
        assert_same(bert_model, before)

    missing = dict(good_state)
    del missing["bert.encoder.layer.1.output.dense.bias"]
    attempt(
        missing,
        r"lacks 1 key\(s\).*\['bert.encoder.layer.1.output.dense.bias'\]",
    )
    corrupt = dict(good_state)
    corrupt[f"{last}.quant_map"] = corrupt[f"{last}.quant_map"] * 2
    attempt(corrupt, f"'{last}.quant_map' must be the NF4 code table")
    extra = dict(good_state, **{"bert.embeddings.word_embeddings.weight": 0})
    attempt(extra, r"1 key\(s\) match no QLoRA layer.*strict=False")
    from_bitsandbytes_model(bert_model, extra, naming="hf-bert", strict=False)
    stray = dict(good_state)
    stray["bert.cls.dense" + QUANT_STATE] = stray[last + QUANT_STATE[7:]]
    attempt(stray, "They are 4-bit weights", strict=False)
    junk = dict(good_state, **{f"{last}.absmax2": 0})
    attempt(junk, "entries of the loaded modules", strict=False)
    attempt({"a": 1}, "no key of the model's modules was found")
    attempt([1], "expects a state_dict mapping", error=TypeError)
    bad_bias = dict(good_state, **{"bert.pooler.dense.bias": np.zeros(3)})
    attempt(bad_bias, r"'bert.pooler.dense.bias' must be a float vector")


def test_torch_bfloat16_biases_widen_exactly(bnb, bert_model, good_state):
    state_dict = dict(good_state)
    key = "bert.encoder.layer.0.intermediate.dense.bias"
    bias = bnb.torch.from_numpy(state_dict[key]).to(bnb.torch.bfloat16)
    state_dict[key] = bias
    from_bitsandbytes_model(bert_model, state_dict, naming="hf-bert")
    layer = bert_model.qlora_layers()[
        "transformer_layer_0/feedforward_intermediate_dense"
    ]
    np.testing.assert_array_equal(layer.bias.numpy(), bias.float().numpy())
    assert not np.array_equal(layer.bias.numpy(), good_state[key])


def test_shape_and_settings_mismatch(bert_model, good_state):
    other = numpy_state(
        hf_linear_weights("bert"), "bert.", double_quant=True, block_size=64
    )
    with pytest.raises(
        ValueError,
        match="uses block size 64; layer .* uses 32. apply\\(\\) the model "
        "with block_size=64",
    ):
        from_bitsandbytes_model(bert_model, other, naming="hf-bert")
    flat = numpy_state(hf_linear_weights("bert"), "bert.", double_quant=False)
    with pytest.warns(UserWarning, match="double quantized to fit"):
        from_bitsandbytes_model(bert_model, flat, naming="hf-bert")
    wide = dict(good_state)
    key = "bert.pooler.dense.weight"
    state = quantize_nf4(np.ones((32, 64), "float32"), 32)
    wide.update(to_bitsandbytes(state, prefix=key))
    with pytest.raises(
        ValueError,
        match=r"holds a weight \[out, in\] = \[64, 32\]; layer "
        r"'pooled_dense' needs \[out, in\] = \[32, 32\]",
    ):
        from_bitsandbytes_model(bert_model, wide, naming="hf-bert")


def test_models_the_naming_does_not_cover(bert_model):
    gpt2 = qlora(tiny_gpt2(seed=4), block_size=32, exclude_modules=["key"])
    with pytest.raises(
        ValueError,
        match="naming='hf-bert' has no Hugging Face name for layers "
        r"\['transformer_layer_0/self_attention/query', .*Mapped layer kinds: "
        r"\['transformer_layer_\{i\}/self_attention_layer/query',",
    ):
        to_bitsandbytes_model(gpt2, naming="hf-bert")
    with pytest.raises(
        ValueError,
        match=r"'h.0.attn.c_attn' is one weight for 3 of our layers .*"
        r"pieces \[1\] are missing",
    ):
        to_bitsandbytes_model(gpt2, naming="hf-gpt2")
    with pytest.raises(ValueError, match="naming must be one of"):
        to_bitsandbytes_model(bert_model, naming="bert")
    with pytest.raises(TypeError, match="expects the model returned by"):
        to_bitsandbytes_model(bert_model.base_model)
    assert keras_qlora.interop.to_bitsandbytes_model is to_bitsandbytes_model
