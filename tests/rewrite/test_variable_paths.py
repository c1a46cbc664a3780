"""QLoRA layers' variables keep the path of the float layer they replace.

`transformer_layer_0/self_attention/query/kernel` becomes
`transformer_layer_0/self_attention/query/lora_a` (not `query/lora_a` in
every block): paths are unique and name their place in the model, after
apply(), a `.keras` round trip, from_preset, add_adapter and merges. Files
written before this change (tests/data/legacy_gpt2, see
make_legacy_files.py there) still load.
"""

import collections
import os
import shutil

import keras
import keras_hub
import numpy as np
import pytest
import safetensors.numpy

import keras_qlora
from keras_qlora import surgery

LEGACY = os.path.join(
    os.path.dirname(__file__), os.pardir, "data", "legacy_gpt2"
)
_TINY = dict(vocabulary_size=64, num_layers=2, hidden_dim=16)


def _backbone(family):
    if family == "bert":
        return keras_hub.models.BertBackbone(
            **_TINY, num_heads=2, intermediate_dim=32, max_sequence_length=16
        )
    if family == "gpt2":
        return keras_hub.models.GPT2Backbone(
            **_TINY, num_heads=2, intermediate_dim=32, max_sequence_length=16
        )
    if family == "llama":
        return keras_hub.models.LlamaBackbone(
            **_TINY,
            num_query_heads=2,
            num_key_value_heads=1,
            intermediate_dim=32,
        )
    return keras_hub.models.GemmaBackbone(
        **_TINY,
        num_query_heads=2,
        num_key_value_heads=1,
        intermediate_dim=32,
        head_dim=8,
    )


def _inputs(family):
    x = {
        "token_ids": np.random.default_rng(0).integers(1, 64, (2, 6)),
        "padding_mask": np.ones((2, 6), "int32"),
    }
    if family == "bert":
        x["segment_ids"] = np.zeros((2, 6), "int32")
    return x


def _layer_prefixes(model):
    """`{layer path: its kernel's path less "/kernel"}` of linear layers."""
    linear = (keras.layers.Dense, keras.layers.EinsumDense)
    return {
        e.path: e.layer.kernel.path.rpartition("/")[0]
        for e in surgery.walk(model)
        if isinstance(e.layer, linear)
    }


def _apply(model, **kwargs):
    return keras_qlora.apply(
        model, rank=2, target_modules="all-linear", verbose=False, **kwargs
    )


def _duplicates(model):
    counts = collections.Counter(v.path for v in model.weights)
    return sorted(p for p, n in counts.items() if n > 1)


def _check_paths(model, prefixes):
    """Unique paths; every QLoRA variable at `<float prefix>/<name>`."""
    assert _duplicates(model) == []
    layers = model.qlora_layers()
    assert layers and set(layers) <= set(prefixes)
    for path, layer in layers.items():
        for variable in layer.weights:
            assert variable.path == f"{prefixes[path]}/{variable.name}"


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "gemma"])
def test_apply_keeps_the_replaced_layers_paths(family):
    backbone = _backbone(family)
    prefixes = _layer_prefixes(backbone)
    model = _apply(backbone)
    assert len(model.qlora_layers()) == len(prefixes)
    _check_paths(model, prefixes)


def test_named_query_path_in_gpt2():
    model = _apply(_backbone("gpt2"))
    query = model.qlora_layers()["transformer_layer_0/self_attention/query"]
    assert query.lora_a.path == (
        "transformer_layer_0/self_attention/query/lora_a"
    )


def test_add_adapter_and_keras_round_trip(tmp_path):
    backbone = _backbone("gpt2")
    prefixes = _layer_prefixes(backbone)
    model = _apply(backbone)
    keras_qlora.add_adapter(model, "second")
    _check_paths(model, prefixes)
    layer = model.qlora_layers()["transformer_layer_1/self_attention/query"]
    assert layer.adapter_variables("second")[0].path == (
        "transformer_layer_1/self_attention/query/lora_a_second"
    )
    x = _inputs("gpt2")
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    _check_paths(restored, prefixes)
    np.testing.assert_array_equal(restored(x), model(x))
    keras_qlora.add_adapter(restored, "third")
    _check_paths(restored, prefixes)


def test_merge_requantize_unmerge_and_float_merge():
    backbone = _backbone("llama")
    prefixes = _layer_prefixes(backbone)
    float_paths = [v.path for v in backbone.weights]
    model = _apply(backbone)
    keras_qlora.merge(model, requantize=True)
    _check_paths(model, prefixes)
    keras_qlora.unmerge(model)
    _check_paths(model, prefixes)
    merged = keras_qlora.merge(model)
    assert [v.path for v in merged.weights] == float_paths


def test_from_preset_keeps_the_paths(tmp_path):
    backbone = _backbone("gpt2")
    prefixes = _layer_prefixes(backbone)
    preset = os.path.join(tmp_path, "preset")
    backbone.save_to_preset(preset)
    model = keras_qlora.from_preset(
        keras_hub.models.GPT2Backbone,
        preset,
        rank=2,
        target_modules="all-linear",
        verbose=False,
    )
    _check_paths(model, prefixes)


# -- files written before this change ----------------------------------------


def _legacy():
    expected = dict(np.load(os.path.join(LEGACY, "expected.npz")))
    x = {
        "token_ids": expected["x_token_ids"],
        "padding_mask": expected["x_padding_mask"],
    }
    model = keras.saving.load_model(os.path.join(LEGACY, "model.keras"))
    return model, x, expected


def test_legacy_keras_file_loads_with_the_new_paths():
    model, x, expected = _legacy()
    np.testing.assert_allclose(model(x), expected["out_default"], atol=1e-6)
    assert _duplicates(model) == []
    query = model.qlora_layers()["transformer_layer_1/self_attention/query"]
    assert query.adapter_variables("extra")[1].path == (
        "transformer_layer_1/self_attention/query/lora_b_extra"
    )
    keras_qlora.set_adapter(model, "extra")
    np.testing.assert_allclose(model(x), expected["out_extra"], atol=1e-6)


def test_legacy_adapter_file_loads():
    model, x, expected = _legacy()
    keras_qlora.load_adapter(
        model, os.path.join(LEGACY, "adapter_extra"), "from_file"
    )
    keras_qlora.set_adapter(model, "from_file")
    np.testing.assert_allclose(model(x), expected["out_extra"], atol=1e-6)


def test_legacy_training_checkpoint_restores(tmp_path):
    # Its optimizer slots are named after the old paths (`query_lora_a_
    # momentum` in both blocks).
    model, x, expected = _legacy()
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="mse")
    directory = os.path.join(tmp_path, "ckpt")
    shutil.copytree(os.path.join(LEGACY, "checkpoint"), directory)
    assert keras_qlora.training.restore_checkpoint(model, directory) == 1
    np.testing.assert_allclose(model(x), expected["out_trained"], atol=1e-6)
    saved = safetensors.numpy.load_file(
        os.path.join(directory, "ckpt-000001", "optimizer.safetensors")
    )
    for i, variable in enumerate(model.optimizer.variables):
        np.testing.assert_array_equal(variable.numpy(), saved[str(i)])
    # Written again, with the new slot names, it restores as well.
    keras_qlora.training.save_checkpoint(model, directory, epoch=2)
    assert keras_qlora.training.restore_checkpoint(model, directory) == 2
