"""surgery.walk / replace / release_variables on every kind of model.

A layer swapped in must be the one the model runs (outputs computed with
it), hold the old layer's place everywhere (graph, layer lists, attributes,
weight order), and the old layer must keep no variable alive.
"""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from keras_qlora import surgery


def _twin(layer, input_shape, zero=False):
    """A new layer of `layer`'s config with its weights (or zeros)."""
    new = type(layer).from_config(
        dict(layer.get_config(), name=layer.name + "_new")
    )
    new.build(input_shape)
    weights = layer.get_weights()
    new.set_weights([np.zeros_like(w) for w in weights] if zero else weights)
    return new


def _entry(root, path):
    found = {e.path: e for e in surgery.walk(root)}
    assert path in found, sorted(found)
    return found[path]


def _variable_children(layer):
    children = tf.train.TrackableView(layer).children(layer)
    return [
        k
        for k, v in children.items()
        if isinstance(v, (keras.Variable, tf.Variable))
    ]


def _functional():
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(2, name="head")(h)
    return keras.Model(inputs, outputs)


def test_walk_lists_each_layer_once_parents_first_with_all_slots():
    class Model(keras.Model):
        def __init__(self):
            super().__init__()
            self.shared = keras.layers.Dense(3, name="shared")
            self.blocks = [self.shared, keras.layers.Dense(3, name="other")]

        def call(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = Model()
    model(np.ones((1, 3), "float32"))
    entries = surgery.walk(model)
    paths = [e.path for e in entries]
    assert sorted(paths) == ["other", "shared"]
    shared = entries[paths.index("shared")]
    assert sorted((s.kind, s.key) for s in shared.slots) == [
        ("attr", "shared"),
        ("item", "blocks"),
    ]
    inner = _functional()
    nested = keras.Sequential([keras.Input((3,)), inner])
    paths = [e.path for e in surgery.walk(nested)]
    assert paths[0] == inner.name
    assert {f"{inner.name}/hidden", f"{inner.name}/head"} <= set(paths)


def test_replace_in_functional_keeps_graph_and_outputs():
    model = _functional()
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    want = model(x)
    entry = _entry(model, "hidden")
    assert [s.kind for s in entry.slots] == ["functional"]
    old = entry.layer
    new = _twin(old, (None, 3))
    surgery.replace(entry, new)
    assert model.get_layer("hidden_new") is new
    assert all(layer is not old for layer in model.layers)
    np.testing.assert_allclose(model(x), want, rtol=1e-6)
    assert old.weights == []
    # The model runs the new layer: changing it changes the outputs.
    new.kernel.assign(np.zeros((3, 4), "float32"))
    head = model.get_layer("head")
    np.testing.assert_allclose(model(x), head(new(x)), rtol=1e-6)


def test_replace_in_functional_refuses_a_connected_layer():
    model = _functional()
    other = _functional()
    entry = _entry(model, "hidden")
    with pytest.raises(ValueError, match="already connected in a graph"):
        surgery.replace(entry, other.get_layer("hidden"))


def test_replace_in_sequential_keeps_outputs():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="relu", name="hidden"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    x = np.random.default_rng(1).normal(size=(5, 3)).astype("float32")
    want = model(x)
    entry = _entry(model, "hidden")
    assert [s.kind for s in entry.slots] == ["sequential"]
    new = _twin(entry.layer, (None, 3))
    surgery.replace(entry, new)
    assert [layer.name for layer in model.layers] == ["hidden_new", "head"]
    np.testing.assert_allclose(model(x), want, rtol=1e-6)
    zero = _twin(new, (None, 3), zero=True)
    surgery.replace(_entry(model, "hidden_new"), zero)
    np.testing.assert_allclose(
        model(x), model.get_layer("head")(zero(x)), rtol=1e-6
    )


class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(4, name="first")
        self.blocks = [self.first, keras.layers.Dense(2, name="second")]

    def call(self, x):
        return self.blocks[1](self.first(x))


def test_replace_in_subclassed_model_updates_every_slot_and_weight_order():
    model = _Subclassed()
    x = np.random.default_rng(2).normal(size=(5, 3)).astype("float32")
    want = model(x)
    entry = _entry(model, "first")
    old = entry.layer
    new = _twin(old, (None, 3))
    surgery.replace(entry, new)
    assert model.first is new and model.blocks[0] is new
    order = [*new.weights, *model.blocks[1].weights]
    assert [id(v) for v in model.weights] == [id(v) for v in order]
    np.testing.assert_allclose(model(x), want, rtol=1e-6)
    assert old.weights == []


def test_replace_in_keras_hub_backbone():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=6,
    )
    x = {
        "token_ids": np.array([[1, 2, 3, 4, 5, 6]], "int32"),
        "segment_ids": np.zeros((1, 6), "int32"),
        "padding_mask": np.ones((1, 6), "int32"),
    }
    want = backbone(x)["sequence_output"]
    count = len(backbone.weights)
    path = "transformer_layer_0/feedforward_intermediate_dense"
    entry = _entry(backbone, path)
    block = _entry(backbone, "transformer_layer_0")
    assert {s.kind for s in block.slots} == {"functional", "item"}
    new = _twin(entry.layer, (None, None, 8))
    surgery.replace(entry, new)
    assert len(backbone.weights) == count
    got = backbone(x)["sequence_output"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    new.kernel.assign(np.zeros(new.kernel.shape, "float32"))
    changed = backbone(x)["sequence_output"]
    assert not np.allclose(changed, want)


def test_release_variables_drops_every_reference():
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    assert _variable_children(dense)
    surgery.release_variables(dense)
    assert dense.weights == []
    assert not any(isinstance(v, keras.Variable) for v in vars(dense).values())
    assert _variable_children(dense) == []
