"""apply(): selection, replacement in every kind of model, freezing, errors."""

import gc
import os
import re
import weakref

import keras
import keras_hub
import numpy as np
import pytest

import keras_qlora
from keras_qlora import surgery
from keras_qlora.layers import QLoRADense
from keras_qlora.layers import QLoRAEinsumDense
from keras_qlora.layers import QLoRALayerBase


def _sequential():
    return keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(48, activation="relu", name="query"),
            keras.layers.Dense(40, name="value"),
            keras.layers.Dense(8, name="out"),
        ]
    )


def _functional():
    inp = keras.Input((32,))
    h = keras.layers.Dense(48, name="query")(inp)
    h = keras.layers.Activation("relu")(h)
    out = keras.layers.Dense(4, name="head")(h)
    return keras.Model(inp, out)


def _two_encoders():
    inp = keras.Input((32,))
    h = keras_hub.layers.TransformerEncoder(16, 2, name="enc0")(inp[:, None])
    h = keras_hub.layers.TransformerEncoder(16, 2, name="enc1")(h)
    return keras.Model(inp, h)


class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [
            keras.layers.Dense(32, name=f"block_{i}") for i in range(2)
        ]
        self.query = keras.layers.Dense(16, name="query")

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return self.query(x)


def _qlora_layers(model):
    return {
        e.path: e.layer
        for e in surgery.walk(model.base_model)
        if isinstance(e.layer, QLoRALayerBase)
    }


def _dequantized_twin(float_model, qmodel):
    """Puts each QLoRA layer's dequantized kernel into the float model."""
    qlayers = _qlora_layers(qmodel)
    for entry in surgery.walk(float_model):
        layer = qlayers.get(entry.path)
        if layer is None:
            continue
        w = keras_qlora.dequantize_nf4(layer.nf4_state())
        if isinstance(layer, QLoRAEinsumDense):
            w = layer.plan.kernel_from_2d(w)
        entry.layer.kernel.assign(w)


def _x(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype("float32")


def test_sequential_all_linear_with_lora_on_targets():
    model = _sequential()
    q = keras_qlora.apply(model, rank=4, verbose=False)
    layers = _qlora_layers(q)
    assert sorted(layers) == ["out", "query", "value"]
    assert layers["query"].rank == 4 and layers["value"].rank == 4
    assert layers["out"].rank is None
    # Under the Sequential's name scope, as the float kernels were.
    base = model.name
    assert [v.path for v in q.trainable_variables] == [
        f"{base}/query/lora_a",
        f"{base}/query/lora_b",
        f"{base}/value/lora_a",
        f"{base}/value/lora_b",
    ]
    assert q.qlora_report["unmatched_targets"] == ["key"]


def test_output_at_init_equals_dequantized_float_model():
    model, twin = _sequential(), _sequential()
    twin.set_weights(model.get_weights())
    x = _x(5, 32)
    q = keras_qlora.apply(model, rank=4, verbose=False)
    _dequantized_twin(twin, q)
    np.testing.assert_allclose(q(x), twin(x), atol=1e-5)


def test_float_kernel_memory_is_released():
    model = _sequential()
    kernel_ref = weakref.ref(model.layers[0].kernel)
    keras_qlora.apply(model, rank=4, verbose=False)
    gc.collect()
    assert kernel_ref() is None


def test_functional_modules_to_save_stay_float_and_trainable():
    model = _functional()
    x = _x(3, 32)
    q = keras_qlora.apply(
        model, rank=4, modules_to_save=["head"], verbose=False
    )
    head = q.base_model.get_layer("head")
    assert type(head) is keras.layers.Dense
    assert isinstance(q.base_model.get_layer("query"), QLoRADense)
    assert [v.path for v in q.trainable_variables] == [
        "query/lora_a",
        "query/lora_b",
        "head/kernel",
        "head/bias",
    ]
    assert np.isfinite(q(x)).all()


def test_subclassed_model_list_and_attribute_layers():
    model = _Subclassed()
    x = _x(3, 8)
    model(x)
    q = keras_qlora.apply(model, rank=2, verbose=False)
    assert all(isinstance(b, QLoRADense) for b in model.blocks)
    assert isinstance(model.query, QLoRADense)
    assert model.query.rank == 2 and model.blocks[0].rank is None
    assert q(x).shape == (3, 16)


def test_nested_keras_hub_attention_sublayers_are_replaced():
    inp = keras.Input((6, 32))
    out = keras_hub.layers.TransformerEncoder(
        intermediate_dim=64, num_heads=2, name="encoder"
    )(inp)
    model = keras.Model(inp, out)
    x = _x(2, 6, 32)
    q = keras_qlora.apply(model, rank=4, verbose=False)
    encoder = q.base_model.get_layer("encoder")
    attention = encoder._self_attention_layer
    assert isinstance(attention._query_dense, QLoRAEinsumDense)
    assert isinstance(attention._output_dense, QLoRAEinsumDense)
    assert attention._output_dense.rank is None
    assert isinstance(encoder._feedforward_intermediate_dense, QLoRADense)
    assert np.isfinite(q(x)).all()


@pytest.mark.parametrize(
    "selector, expected",
    [
        (["query"], ["query"]),
        (("value", "out"), ["out", "value"]),
        ("qu.*|out", ["out", "query"]),
        (re.compile("val.*"), ["value"]),
        (lambda path, layer: layer.units == 40, ["value"]),
        ("all-linear", ["out", "query", "value"]),
    ],
)
def test_target_selectors(selector, expected):
    q = keras_qlora.apply(
        _sequential(), rank=2, target_modules=selector, verbose=False
    )
    with_lora = sorted(
        p for p, layer in _qlora_layers(q).items() if layer.has_lora
    )
    assert with_lora == expected


def test_path_suffix_and_quantize_only_targets():
    q = keras_qlora.apply(
        _two_encoders(),
        rank=2,
        target_modules=["enc1/self_attention_layer/query"],
        quantize_modules=None,
        verbose=False,
    )
    assert list(_qlora_layers(q)) == ["enc1/self_attention_layer/query"]


def test_single_string_is_a_regex_on_paths_and_names():
    q = keras_qlora.apply(
        _two_encoders(), rank=2, target_modules="query", verbose=False
    )
    assert sorted(q.qlora_layers(lora_only=True)) == [
        "enc0/self_attention_layer/query",
        "enc1/self_attention_layer/query",
    ]
    q = keras_qlora.apply(
        _two_encoders(),
        rank=2,
        target_modules=r"enc1/.*/(key|value)",
        quantize_modules=None,
        verbose=False,
    )
    assert sorted(q.qlora_layers()) == [
        "enc1/self_attention_layer/key",
        "enc1/self_attention_layer/value",
    ]


def test_exclude_modules_and_vocabulary_head():
    inp = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(50, 16, name="embed")(inp)
    h = keras.layers.Dense(16, name="query")(h)
    h = keras.layers.Dense(12, name="mlp")(h)
    logits = keras.layers.Dense(50, name="lm_head")(h)
    model = keras.Model(inp, logits)
    q = keras_qlora.apply(model, rank=2, exclude_modules=["mlp"], verbose=False)
    assert list(_qlora_layers(q)) == ["query"]


def test_gpt2_backbone_all_linear_and_round_trip(tmp_path):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=500,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=32,
    )
    x = {
        "token_ids": np.random.default_rng(1).integers(0, 500, (2, 12)),
        "padding_mask": np.ones((2, 12), "int32"),
    }
    q = keras_qlora.apply(
        backbone, rank=4, target_modules="all-linear", verbose=False
    )
    layers = _qlora_layers(q)
    assert len(layers) == 12 and all(
        layer.has_lora for layer in layers.values()
    )
    out = q(x)
    assert np.isfinite(out).all()
    path = os.path.join(tmp_path, "gpt2.keras")
    q.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_array_equal(restored(x), out)


def test_nothing_matched_lists_linear_layers():
    with pytest.raises(ValueError, match=r"not found.*query, value, out"):
        keras_qlora.apply(_sequential(), target_modules=["attn"], verbose=False)


def test_apply_twice_is_refused():
    model = _sequential()
    q = keras_qlora.apply(model, verbose=False)
    with pytest.raises(ValueError, match="already applied"):
        keras_qlora.apply(q, verbose=False)
    with pytest.raises(ValueError, match="already applied.*QLoRA layers"):
        keras_qlora.apply(model, verbose=False)


def test_bad_settings():
    with pytest.raises(ValueError, match=r"block_size must be one of"):
        keras_qlora.apply(_sequential(), block_size=48, verbose=False)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        keras_qlora.apply(_sequential(), rank=0, verbose=False)
    with pytest.raises(ValueError, match=r"'query': rank must be <= min"):
        keras_qlora.apply(_sequential(), rank=33, verbose=False)
    with pytest.raises(TypeError, match="module selector must be"):
        keras_qlora.apply(_sequential(), target_modules=3, verbose=False)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        keras_qlora.apply(_sequential(), target_modules="(", verbose=False)
    with pytest.raises(ValueError, match="is not built"):
        keras_qlora.apply(keras.Sequential([keras.layers.Dense(3)]))
    with pytest.raises(TypeError, match="expects a Keras model"):
        keras_qlora.apply(object())


def test_non_finite_kernel_names_the_layer():
    model = _sequential()
    kernel = model.get_layer("value").kernel
    kernel.assign(np.where(np.eye(48, 40) > 0, np.nan, kernel.numpy()))
    with pytest.raises(ValueError, match=r"'value'.*non-finite"):
        keras_qlora.apply(model, verbose=False)


def test_summary_reports_measured_memory():
    q = keras_qlora.apply(_sequential(), rank=4, verbose=False)
    lines = []
    text = keras_qlora.summary(q, print_fn=lines.append)
    info = keras_qlora.report.collect(q)
    float_bytes = 4 * (32 * 48 + 48 + 48 * 40 + 40 + 40 * 8 + 8)
    assert info["bytes_before"] == float_bytes
    assert info["trainable_params"] == 4 * (32 + 48) + 4 * (48 + 40)
    assert info["total_params"] == float_bytes // 4 + info["trainable_params"]
    assert info["bytes_after"] < 0.3 * float_bytes
    assert "Replaced layers: 3 NF4 (2 with LoRA)" in text and lines == [text]
    with pytest.raises(TypeError, match="expects the model returned"):
        keras_qlora.summary(_sequential())


def test_all_linear_compares_full_output_width_with_the_vocabulary():
    # An attention EinsumDense whose head size equals the vocabulary size
    # is not an output head: N (heads * head size) is what counts.
    tokens = keras.Input((8,), dtype="int32")
    h = keras.layers.Embedding(16, 32, name="embed")(tokens)
    q = keras.layers.EinsumDense(
        "abc,cde->abde", output_shape=(None, 2, 16), name="query"
    )(h)
    h2 = keras.layers.Reshape((8, 32))(q)
    logits = keras.layers.Dense(16, name="lm_head")(h2)
    model = keras.Model(tokens, logits)
    result = keras_qlora.apply(
        model, target_modules="all-linear", verbose=False
    )
    replaced = {r["path"] for r in result.qlora_report["replaced"]}
    assert replaced == {"query"}
