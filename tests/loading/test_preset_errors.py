"""Bad presets and arguments: `from_preset` refuses each with a message that
names the file, tensor or argument, before any model is returned."""

import json
import os

import keras
import keras_hub
import numpy as np
import pytest
import safetensors.numpy

import keras_qlora
import preset_helpers as ph

LLAMA = keras_hub.models.LlamaBackbone
APPLY = dict(target_modules="all-linear", verbose=False)


@pytest.fixture(scope="module")
def hf_preset(tmp_path_factory):
    return ph.write_hf_preset(
        tmp_path_factory.mktemp("hf"), "llama", "float32", sharded=True
    )


@pytest.fixture(scope="module")
def keras_preset(tmp_path_factory, hf_preset):
    return ph.write_keras_preset(
        tmp_path_factory.mktemp("keras"), "llama", hf_preset, sharded=True
    )


def copy_preset(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f:
            data = f.read()
        with open(os.path.join(dst, name), "wb") as f:
            f.write(data)
    return str(dst)


def load(preset, cls=LLAMA, **kwargs):
    return keras_qlora.from_preset(cls, preset, **dict(APPLY, **kwargs))


def test_preset_not_a_path():
    with pytest.raises(TypeError, match=r"preset must be the path.*int"):
        load(3)


def test_remote_handle_refused():
    with pytest.raises(ValueError, match="local preset directories only"):
        load("hf://meta-llama/Llama-2-7b-hf")


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load(str(tmp_path / "nope"))


def test_no_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"has no config.json.*holds: model"):
        load(str(tmp_path))


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json' is not valid JSON"):
        load(str(tmp_path))


def test_config_of_unknown_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden": 4}))
    with pytest.raises(ValueError, match="neither a keras_hub preset"):
        load(str(tmp_path))


def test_family_keras_hub_cannot_convert(tmp_path, hf_preset):
    preset = copy_preset(hf_preset, tmp_path / "p")
    path = os.path.join(preset, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["model_type"] = "rwkv"
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(
        ValueError, match=r"config.json' has model_type='rwkv'.*cannot convert"
    ):
        load(preset)


def test_no_weights(tmp_path, hf_preset):
    preset = copy_preset(hf_preset, tmp_path / "p")
    for name in os.listdir(preset):
        if "safetensors" in name:
            os.remove(os.path.join(preset, name))
    with pytest.raises(ValueError, match=r"has no weights: expected model"):
        load(preset)


def test_shard_listed_but_absent(tmp_path, hf_preset):
    preset = copy_preset(hf_preset, tmp_path / "p")
    os.remove(os.path.join(preset, "model-00002-of-00007.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"model.safetensors.index.json' lists shard\(s\) "
        r"\['model-00002-of-00007.safetensors'\]",
    ):
        load(preset)


def test_keras_shard_listed_but_absent(tmp_path, keras_preset):
    preset = copy_preset(keras_preset, tmp_path / "p")
    os.remove(os.path.join(preset, "model_00001.weights.h5"))
    with pytest.raises(
        ValueError, match=r"model.weights.json' lists shard\(s\)"
    ):
        load(preset)


def test_truncated_safetensors(tmp_path, hf_preset):
    preset = copy_preset(hf_preset, tmp_path / "p")
    path = os.path.join(preset, "model-00003-of-00007.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(
        ValueError, match=r"model-00003-of-00007.safetensors' is truncated"
    ):
        load(preset)


def test_truncated_h5(tmp_path, keras_preset):
    preset = copy_preset(keras_preset, tmp_path / "p")
    path = os.path.join(preset, "model_00000.weights.h5")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(
        ValueError, match=r"model_00000.weights.h5' cannot be read.*truncated"
    ):
        load(preset)


def _rewrite_tensor(preset, key, value):
    """Replaces one tensor of a sharded HF preset (and its header)."""
    with open(os.path.join(preset, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"][key]
    path = os.path.join(preset, shard)
    tensors = dict(safetensors.numpy.load_file(path))
    tensors[key] = value
    safetensors.numpy.save_file(tensors, path)


def test_tensor_with_wrong_shape(tmp_path, hf_preset):
    preset = copy_preset(hf_preset, tmp_path / "p")
    key = "model.layers.1.mlp.up_proj.weight"
    _rewrite_tensor(preset, key, np.zeros((80, 64), "float32"))
    with pytest.raises(
        ValueError,
        match=rf"tensor '{key}' could not be loaded into "
        r"'transformer_layer_1/feedforward_intermediate_dense/kernel' "
        r"\(shape \(64, 96\)\)",
    ):
        load(preset)


def test_tensor_with_wrong_dtype(tmp_path, hf_preset):
    preset = copy_preset(hf_preset, tmp_path / "p")
    key = "model.layers.0.self_attn.o_proj.weight"
    _rewrite_tensor(preset, key, np.zeros((64, 64), "int32"))
    with pytest.raises(
        ValueError,
        match=rf"'{key}'.*attention_output/kernel' has dtype int32; a float "
        "tensor is expected",
    ):
        load(preset)


def test_non_finite_tensor(tmp_path, hf_preset):
    preset = copy_preset(hf_preset, tmp_path / "p")
    key = "model.layers.0.mlp.down_proj.weight"
    value = np.zeros((64, 96), "float32")
    value[3, 5] = np.nan
    _rewrite_tensor(preset, key, value)
    with pytest.raises(
        ValueError,
        match=r"'feedforward_output_dense': its kernel has 1 non-finite",
    ):
        load(preset)


def test_missing_tensor(tmp_path, hf_preset):
    preset = copy_preset(hf_preset, tmp_path / "p")
    key = "model.layers.1.self_attn.k_proj.weight"
    with open(os.path.join(preset, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"][key]
    path = os.path.join(preset, shard)
    tensors = dict(safetensors.numpy.load_file(path))
    del tensors[key]
    safetensors.numpy.save_file(tensors, path)
    with pytest.raises(ValueError, match=rf"tensor '{key}' could not be"):
        load(preset)


def test_wrong_model_class(hf_preset):
    with pytest.raises(TypeError, match="keras_hub Backbone or Task class"):
        keras_qlora.from_preset(keras.Model, hf_preset)


def test_family_mismatch(hf_preset):
    with pytest.raises(ValueError, match="Llama"):
        load(hf_preset, cls=keras_hub.models.GPT2Backbone)


def test_unknown_apply_argument(hf_preset):
    with pytest.raises(TypeError, match=r"'ranks'.*apply\(\) takes: rank"):
        load(hf_preset, ranks=4)


def test_bad_setting_refused_before_reading_weights(tmp_path, hf_preset):
    # The bad tensor would fail the load: the setting is refused first.
    preset = copy_preset(hf_preset, tmp_path / "p")
    key = "model.layers.0.mlp.up_proj.weight"
    _rewrite_tensor(preset, key, np.zeros((80, 64), "float32"))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        load(preset, rank=0)
