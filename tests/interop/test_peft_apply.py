"""`apply_peft_adapter`: LoRA where the PEFT adapter says, in one call."""

import numpy as np
import pytest
from interop_helpers import clone
from interop_helpers import inputs
from interop_helpers import output
from interop_helpers import tiny_bert
from interop_helpers import tiny_gpt2
from test_peft_adapter import write_peft

import keras_qlora
from keras_qlora import surgery
from keras_qlora.interop import apply_peft_adapter
from keras_qlora.interop import load_peft_adapter
from keras_qlora.interop import save_peft_adapter


def _trained(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.qlora_layers(lora_only=True).values():
        for v in (layer.lora_a, layer.lora_b):
            v.assign(rng.standard_normal(v.shape).astype("float32") * 0.1)


def test_subset_adapter_of_an_all_linear_model_gpt2(tmp_path):
    # The case: the adapter covers c_attn and c_proj, the user's
    # model quantizes every linear layer.
    float_model = tiny_gpt2(seed=1)
    source = keras_qlora.apply(
        clone(float_model),
        rank=2,
        alpha=6,
        target_modules=["query", "key", "value", "attention_output"],
        quantize_modules="all-linear",
        double_quant=False,
        verbose=False,
    )
    _trained(source, seed=2)
    path = str(tmp_path / "peft")
    save_peft_adapter(source, path, naming="hf-gpt2")
    # load_peft_adapter into an all-linear LoRA model is refused ...
    all_linear = keras_qlora.apply(
        clone(float_model),
        rank=2,
        alpha=6,
        target_modules="all-linear",
        double_quant=False,
        verbose=False,
    )
    with pytest.raises(ValueError, match="only in the model"):
        load_peft_adapter(all_linear, path, naming="hf-gpt2")
    # ... apply_peft_adapter puts LoRA where the adapter says, in one call.
    model = apply_peft_adapter(
        clone(float_model),
        path,
        naming="hf-gpt2",
        quantize_modules="all-linear",
        double_quant=False,
        verbose=False,
    )
    assert sorted(model.qlora_layers(lora_only=True)) == sorted(
        source.qlora_layers(lora_only=True)
    )
    assert sorted(model.qlora_layers()) == sorted(source.qlora_layers())
    assert (model.settings.rank, model.settings.alpha) == (2, 6.0)
    np.testing.assert_allclose(
        output(model, "gpt2"), output(source, "gpt2"), rtol=1e-5, atol=1e-5
    )


def test_peft_written_adapter_bert(tmp_path):
    backbone = tiny_bert(seed=4)
    rng = np.random.default_rng(0)
    pairs = {}
    for module in (
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.value",
    ):
        pairs[module] = (
            rng.standard_normal((4, 32)).astype("float32") * 0.2,
            rng.standard_normal((32, 4)).astype("float32") * 0.2,
        )
    path = str(tmp_path / "peft")
    write_peft(
        path,
        pairs,
        config={"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
    )
    model = apply_peft_adapter(backbone, path, naming="hf-bert", verbose=False)
    lora = model.qlora_layers(lora_only=True)
    assert sorted(lora) == [
        "transformer_layer_0/self_attention_layer/query",
        "transformer_layer_0/self_attention_layer/value",
    ]
    assert (model.settings.rank, model.settings.lora_scale) == (4, 2.0)
    query = lora["transformer_layer_0/self_attention_layer/query"]
    a, b = pairs["encoder.layer.0.attention.self.query"]
    np.testing.assert_array_equal(query.lora_a.numpy(), a.T)
    np.testing.assert_array_equal(query.lora_b.numpy(), b.T)


def test_refusals_leave_the_model_float(tmp_path):
    backbone = tiny_bert(seed=4)
    rng = np.random.default_rng(0)
    pairs = {
        "encoder.layer.0.attention.self.query": (
            rng.standard_normal((4, 32)).astype("float32"),
            rng.standard_normal((32, 4)).astype("float32"),
        ),
        "encoder.layer.0.attention.self.value": (
            rng.standard_normal((2, 32)).astype("float32"),
            rng.standard_normal((32, 2)).astype("float32"),
        ),
    }
    path = str(tmp_path / "mixed")
    write_peft(path, pairs, config={"r": 4, "rank_pattern": {"value": 2}})
    with pytest.raises(ValueError, match="different ranks or scales"):
        apply_peft_adapter(backbone, path, naming="hf-bert", verbose=False)
    with pytest.raises(TypeError, match=r"takes \['rank'\] from the adapter"):
        apply_peft_adapter(backbone, path, naming="hf-bert", rank=4)
    assert not any(
        isinstance(entry.layer, keras_qlora.layers.QLoRALayerBase)
        for entry in surgery.walk(backbone)
    )
