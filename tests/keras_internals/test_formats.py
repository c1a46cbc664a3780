"""The Keras / TensorFlow / keras_hub behaviour `keras_qlora.internals`
uses: Export, EinsumDense, keras_hub presets, variable paths and attention.

One test per function; each failure names the behaviour that changed and
the function of keras_qlora/internals/ to update.
"""

import keras
import numpy as np
import pytest

from keras_qlora import internals

from ._support import changed
from ._support import functional

# -- export -------------------------------------------------------------------


def test_input_signature():
    model, _ = functional()
    signature = internals.input_signature(model)
    message = changed(
        "input_signature",
        "keras.src.export.export_utils.get_input_signature no longer gives "
        "one InputSpec per model input",
    )
    assert len(signature) == 1, message
    assert tuple(signature[0].shape) == (None, 3), message


def test_export_archive_trackable():
    model, _ = functional()
    archive = keras.export.ExportArchive()
    archive.track(model)
    trackable = internals.export_archive_trackable(archive)
    message = changed(
        "export_archive_trackable",
        "ExportArchive._tf_trackable no longer holds the tracked variables "
        "in .variables / .trainable_variables / .non_trainable_variables",
    )
    assert trackable is not None, message
    assert len(trackable.variables) == len(model.variables), message
    assert isinstance(trackable.trainable_variables, list), message
    assert isinstance(trackable.non_trainable_variables, list), message


# -- EinsumDense ------------------------------------------------------------


def test_analyze_einsum_string():
    kernel, bias, full_output, *_ = internals.analyze_einsum_string(
        "abc,cde->abde", "de", (None, 5, 3), (5, 4, 2)
    )
    layer = keras.layers.EinsumDense(
        "abc,cde->abde", output_shape=(5, 4, 2), bias_axes="de"
    )
    layer.build((None, 5, 3))
    message = changed(
        "analyze_einsum_string",
        "_analyze_einsum_string no longer returns (kernel_shape, "
        "bias_shape, full_output_shape, ...) as EinsumDense.build uses them",
    )
    assert tuple(kernel) == tuple(layer.kernel.shape), message
    assert tuple(bias) == tuple(layer.bias.shape), message
    assert tuple(full_output) == (None, 5, 4, 2), message


# -- keras_hub presets ------------------------------------------------------


def _bert(seed):
    import keras_hub

    keras.utils.set_random_seed(seed)
    return keras_hub.models.BertBackbone(
        vocabulary_size=20,
        num_layers=1,
        num_heads=1,
        hidden_dim=4,
        intermediate_dim=4,
        max_sequence_length=4,
    )


@pytest.fixture(scope="module")
def keras_preset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("preset")
    backbone = _bert(seed=0)
    backbone.save_to_preset(str(directory))
    return str(directory), backbone


def test_preset_loader(keras_preset, tmp_path):
    directory, _ = keras_preset
    loader = internals.preset_loader(directory)
    message = changed(
        "preset_loader",
        "keras_hub's get_preset_loader no longer gives a loader with "
        ".config, or no longer raises ValueError for an unknown preset",
    )
    assert loader.config["class_name"].endswith("BertBackbone"), message
    with pytest.raises(ValueError):
        internals.preset_loader(str(tmp_path))


def test_load_backbone_weights(keras_preset):
    directory, saved = keras_preset
    backbone = _bert(seed=1)
    internals.load_backbone_weights(
        internals.preset_loader(directory), backbone
    )
    for got, want in zip(backbone.weights, saved.weights, strict=True):
        np.testing.assert_array_equal(
            got.numpy(),
            want.numpy(),
            err_msg=changed(
                "load_backbone_weights",
                "KerasPresetLoader._load_backbone_weights(backbone) no "
                "longer fills the backbone from the preset",
            ),
        )


def test_safetensor_loader_class(tmp_path):
    from safetensors.numpy import save_file

    save_file({"encoder.w": np.arange(3, dtype="float32")}, tmp_path / "m.st")
    loader_class = internals.safetensor_loader_class()
    message = changed(
        "safetensor_loader_class",
        "keras_hub's SafetensorLoader(preset, fname=...) no longer has "
        ".safetensor_config / .fname / get_prefixed_key / get_tensor / "
        "port_weight",
    )
    assert callable(getattr(loader_class, "port_weight", None)), message
    with loader_class(str(tmp_path), fname="m.st") as loader:
        assert loader.safetensor_config is None, message
        assert loader.fname == "m.st", message
        key = loader.get_prefixed_key("w", {"encoder.w": None})
        assert key == "encoder.w", message
        np.testing.assert_array_equal(loader.get_tensor("w"), [0, 1, 2])


def _mha():
    layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.2)
    x = np.ones((1, 3, 5), "float32")
    layer(x, x)
    return layer, x


def test_compute_attention_method():
    layer, _ = _mha()
    method = internals.compute_attention_method(layer)
    q = np.ones((1, 3, 2, 4), "float32")
    out, scores = method(q, q, q)
    assert tuple(out.shape) == (1, 3, 2, 4) and tuple(scores.shape) == (
        1,
        2,
        3,
        3,
    ), changed(
        "compute_attention_method",
        "MultiHeadAttention._compute_attention(query, key, value) no longer "
        "returns (output, scores) for projected (B, T, N, H) inputs",
    )


def test_compute_attention_override():
    layer, _ = _mha()
    assert internals.compute_attention_override(layer) is None
    internals.set_compute_attention(layer, len)
    assert internals.compute_attention_override(layer) is len


def test_set_compute_attention():
    layer, x = _mha()
    seen = []
    own = internals.compute_attention_method(layer)

    def hook(*args, **kwargs):
        seen.append(True)
        return own(*args, **kwargs)

    internals.set_compute_attention(layer, hook)
    layer(x, x)
    assert seen, changed(
        "set_compute_attention",
        "MultiHeadAttention.call no longer calls self._compute_attention",
    )
    internals.set_compute_attention(layer, None)
    layer(x, x)
    assert len(seen) == 1


def test_attention_scale():
    layer, _ = _mha()
    assert internals.attention_scale(layer) == pytest.approx(0.5), changed(
        "attention_scale",
        "MultiHeadAttention._inverse_sqrt_key_dim is no longer 1/sqrt(key_dim)",
    )


def test_attention_dropout_rate():
    layer, _ = _mha()
    assert internals.attention_dropout_rate(layer) == pytest.approx(0.2), (
        changed(
            "attention_dropout_rate",
            "MultiHeadAttention._dropout no longer holds the dropout rate",
        )
    )


def test_attention_axes():
    layer, _ = _mha()
    assert internals.attention_axes(layer) == (1,), changed(
        "attention_axes",
        "MultiHeadAttention._attention_axes is no longer (1,) for 3-D inputs",
    )
