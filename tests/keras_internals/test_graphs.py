"""The Keras / TensorFlow / keras_hub behaviour `keras_qlora.internals`
uses: Model surgery and layer state tracking.

One test per function; each failure names the behaviour that changed and
the function of keras_qlora/internals/ to update.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_qlora import internals
from keras_qlora.internals import _base as internal_base

from ._support import built_outer
from ._support import changed
from ._support import functional

# -- the error for a missing internal ------------------------------------


def test_missing_internal_raises_keras_internals_changed():
    with pytest.raises(
        internals.KerasInternalsChanged,
        match=r"keras_qlora needs Keras' Layer\._nope.*setup\.cfg",
    ):
        internal_base.attr(keras.layers.Dense(1), "_nope", "Keras' Layer._nope")
    with pytest.raises(
        internals.KerasInternalsChanged, match=r"keras\.src\.nowhere\.thing"
    ):
        internal_base.private("keras.src.nowhere", "thing", "Keras' thing")


# -- graphs -----------------------------------------------------------------


def test_is_bookkeeping_attr():
    model, _ = functional()
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    for owner in (model, sequential):
        for key, value in vars(owner).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            layers = [v for v in values if isinstance(v, keras.layers.Layer)]
            if key.startswith("_") and layers:
                assert internals.is_bookkeeping_attr(key), changed(
                    "is_bookkeeping_attr",
                    f"{type(owner).__name__} holds layers in a new private "
                    f"attribute {key!r}",
                )
    assert internals.is_bookkeeping_attr("_inbound_nodes")
    assert not internals.is_bookkeeping_attr("transformer_layers")


def test_is_functional():
    import keras_hub

    model, _ = functional()
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=20,
        num_layers=1,
        num_heads=1,
        hidden_dim=4,
        intermediate_dim=4,
        max_sequence_length=4,
    )
    message = changed(
        "is_functional",
        "keras.Model(inputs, outputs) / keras_hub backbones are no longer "
        "keras.src.models.functional.Functional",
    )
    assert internals.is_functional(model), message
    assert internals.is_functional(backbone), message
    assert not internals.is_functional(keras.Sequential([])), message
    assert not internals.is_functional(keras.layers.Dense(1)), message


def test_sequential_layers():
    dense = keras.layers.Dense(2)
    model = keras.Sequential([keras.Input((3,)), dense])
    layers = internals.sequential_layers(model)
    message = changed(
        "sequential_layers",
        "Sequential._layers is not the list (InputLayer first) the model "
        "reads its layers from",
    )
    assert isinstance(layers[0], keras.layers.InputLayer), message
    assert layers[1] is dense, message
    assert internals.sequential_layers(model) is layers, message


def test_rebuild_sequential():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    new = keras.layers.Dense(4)
    layers = internals.sequential_layers(model)
    layers[1] = new
    internals.rebuild_sequential(model)
    out = model(np.ones((1, 3), "float32"))
    message = changed(
        "rebuild_sequential",
        "Sequential._maybe_rebuild() does not rebuild from Sequential._layers",
    )
    assert model.layers == [new], message
    assert tuple(out.shape) == (1, 4), message


def test_inbound_nodes():
    model, dense = functional()
    nodes = internals.inbound_nodes(dense)
    message = changed(
        "inbound_nodes",
        "Operation._inbound_nodes no longer lists the calls of a layer in a "
        "Functional graph, each node with input_tensors",
    )
    assert len(nodes) == 1, message
    assert tuple(nodes[0].input_tensors[0].shape) == (None, 3), message
    assert internals.inbound_nodes(keras.layers.Dense(1)) == [], message


def test_move_graph_nodes():
    model, old = functional()
    new = keras.layers.Dense(2, name="new")
    new.build((None, 3))
    internals.move_graph_nodes(old, new)
    nodes = internals.inbound_nodes(new)
    message = changed(
        "move_graph_nodes",
        "graph nodes (Node.operation, KerasTensor._keras_history) no longer "
        "follow the layer moved into them",
    )
    assert len(nodes) == 1 and nodes[0].operation is new, message
    assert nodes[0].outputs[0]._keras_history.operation is new, message
    assert internals.inbound_nodes(old) == [], message


def test_recompute_functional_graph():
    model, old = functional()
    new = keras.layers.Dense(2, name="new")
    new.build((None, 3))
    internals.move_graph_nodes(old, new)
    internals.recompute_functional_graph(model)
    x = np.ones((2, 3), "float32")
    head = model.get_layer("head")
    message = changed(
        "recompute_functional_graph",
        "map_graph() / Function._nodes, _operations (by depth) no longer "
        "define which layers a Functional model runs",
    )
    assert new in model.layers and old not in model.layers, message
    np.testing.assert_allclose(
        model(x), head(new(x)), rtol=1e-6, err_msg=message
    )


# -- state tracking ---------------------------------------------------------


def test_replace_tracked_layer():
    outer = built_outer()
    new = keras.layers.Dense(2, name="new")
    new.build((None, 3))
    internals.replace_tracked_layer(outer, outer.first, new)
    message = changed(
        "replace_tracked_layer",
        "Layer._tracker.replace_tracked_value no longer keeps the weight "
        "order of a built layer",
    )
    want = [outer.scale, *new.weights, *outer.second.weights]
    assert [id(v) for v in outer.weights] == [id(v) for v in want], message
    # A layer already tracked: the old one is untracked instead.
    internals.replace_tracked_layer(outer, outer.second, new)
    assert [id(v) for v in outer.weights] == [
        id(v) for v in [outer.scale, *new.weights]
    ], message


def test_own_variables():
    outer = built_outer()
    message = changed(
        "own_variables",
        "Layer._trainable_variables / _non_trainable_variables no longer "
        "hold only the layer's own variables",
    )
    assert [id(v) for v in internals.own_variables(outer)] == [
        id(outer.scale)
    ], message


def test_forget_own_variables():
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    internals.forget_own_variables(dense)
    assert dense.weights == [], changed(
        "forget_own_variables",
        "Layer.weights no longer comes from Layer._trainable_variables / "
        "_non_trainable_variables",
    )


def test_forget_checkpoint_variables():
    dense = keras.layers.Dense(2)
    dense.build((None, 3))

    def variable_children():
        children = tf.train.TrackableView(dense).children(dense)
        return [
            k
            for k, v in children.items()
            if isinstance(v, (keras.Variable, tf.Variable))
        ]

    message = changed(
        "forget_checkpoint_variables",
        "a TF layer's checkpoint dependencies no longer live in "
        "_self_unconditional_dependency_names / "
        "_self_unconditional_checkpoint_dependencies",
    )
    assert variable_children(), message
    internals.forget_checkpoint_variables(dense)
    assert variable_children() == [], message


def test_unlocked_state():
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    with pytest.raises(ValueError, match="cannot add new elements of state"):
        dense.add_weight(shape=(1,), name="before")
    with internals.unlocked_state(dense):
        extra = dense.add_weight(shape=(1,), name="extra")
    message = changed(
        "unlocked_state",
        "Layer._tracker.locked / unlock() / lock() no longer guard adding "
        "variables to a built layer",
    )
    assert any(v is extra for v in dense.weights), message
    with pytest.raises(ValueError, match="cannot add new elements of state"):
        dense.add_weight(shape=(1,), name="after")


def test_flatten_layers():
    outer = built_outer()
    message = changed(
        "flatten_layers",
        "Layer._flatten_layers(include_self=...) no longer lists the layer "
        "and its sublayers",
    )
    assert internals.flatten_layers(outer) == [
        outer,
        outer.first,
        outer.second,
    ], message
    assert internals.flatten_layers(outer, include_self=False) == [
        outer.first,
        outer.second,
    ], message
