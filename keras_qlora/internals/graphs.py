"""Private Keras names of Functional / Sequential graphs and layer state
tracking. See the package docstring."""

import contextlib

import keras

from keras_qlora.internals._base import attr
from keras_qlora.internals._base import private

# -- Functional / Sequential graphs (surgery.py, adapters/merge.py) ----------

# Attributes of a layer that hold Keras bookkeeping (the tracker, graph
# nodes, a Sequential's internal Functional), not the model's structure.
_BOOKKEEPING_ATTRS = frozenset(
    "_tracker _layers _operations _inbound_nodes _outbound_nodes _functional "
    "_nodes_by_depth _operations_by_depth _nodes".split()
)


def is_bookkeeping_attr(name) -> bool:
    """Whether instance attribute `name` is Keras bookkeeping that a walk of
    a model's layers must not follow (Keras 3.15 `Layer`, `Functional`,
    `Sequential`: `_tracker`, `_layers`, `_inbound_nodes`, ...)."""
    return name in _BOOKKEEPING_ATTRS


def is_functional(model) -> bool:
    """Whether `model` is a Keras Functional model (`keras.Model(inputs,
    outputs)`, keras_hub backbones). Keras 3.15 exports no public class for
    it: `keras.src.models.functional.Functional`."""
    functional = private(
        "keras.src.models.functional", "Functional", "Keras' Functional class"
    )
    return isinstance(model, functional)


def sequential_layers(model) -> list:
    """The list a `keras.Sequential` reads its layers from, itself (not a
    copy), InputLayer included (Keras 3.15 `Sequential._layers`)."""
    return attr(model, "_layers", "Keras' Sequential._layers list")


def rebuild_sequential(model):
    """Rebuilds a Sequential's internal Functional graph from its layer list
    (Keras 3.15 `Sequential._maybe_rebuild`)."""
    attr(model, "_maybe_rebuild", "Keras' Sequential._maybe_rebuild()")()


def inbound_nodes(layer) -> list:
    """The graph nodes where `layer` was called symbolically (Keras 3.15
    `Operation._inbound_nodes`; each node has `input_tensors`)."""
    return list(
        attr(layer, "_inbound_nodes", "Keras' Operation._inbound_nodes") or []
    )


def move_graph_nodes(old, new):
    """Makes `new` the operation of every graph node of `old`.

    Relies on Keras 3.15 `Operation._inbound_nodes` / `_outbound_nodes`,
    `Node.operation` and the `_keras_history` (a `KerasHistory(operation,
    node_index, tensor_index)`) of each node's output tensors.
    """
    history_class = private(
        "keras.src.ops.node", "KerasHistory", "Keras' KerasHistory"
    )
    what = "Keras' Operation._inbound_nodes / _outbound_nodes"
    new._inbound_nodes = list(attr(old, "_inbound_nodes", what))
    new._outbound_nodes = list(attr(old, "_outbound_nodes", what))
    for node in new._inbound_nodes:
        node.operation = new
        for tensor in node.outputs:
            history = attr(
                tensor, "_keras_history", "Keras' KerasTensor._keras_history"
            )
            if history.operation is old:
                tensor._keras_history = history_class(
                    new, history.node_index, history.tensor_index
                )
    old._inbound_nodes = []
    old._outbound_nodes = []


def recompute_functional_graph(model):
    """Recomputes a Functional model's node and operation bookkeeping from
    its inputs and outputs, after its layers changed (Keras 3.15
    `keras.src.ops.function.map_graph` and `Function._inputs`, `_outputs`,
    `_nodes`, `_nodes_by_depth`, `_operations`, `_operations_by_depth`)."""
    map_graph = private(
        "keras.src.ops.function", "map_graph", "Keras' map_graph()"
    )
    what = "Keras' Function._inputs / _outputs"
    nodes, by_depth, operations, ops_by_depth = map_graph(
        attr(model, "_inputs", what), attr(model, "_outputs", what)
    )
    model._nodes = nodes
    model._nodes_by_depth = by_depth
    model._operations = operations
    model._operations_by_depth = ops_by_depth


# -- layer state tracking (surgery.py, adapters/, layers/) --------------------


def _tracker(layer):
    return attr(layer, "_tracker", "Keras' Layer._tracker")


def replace_tracked_layer(parent, old, new):
    """Puts `new` in place of `old` in `parent`'s tracked sublayers, keeping
    their order, without lifting the lock of a built layer (Keras 3.15
    `Layer._tracker`: `is_in_store`, `untrack`, `replace_tracked_value`, as
    Keras' own `quantize()` uses them). No-op for untracked parents."""
    tracker = getattr(parent, "_tracker", None)
    if tracker is None:
        return
    if tracker.is_in_store("layers", old):
        if tracker.is_in_store("layers", new):
            tracker.untrack(old)
        else:
            tracker.replace_tracked_value("layers", old, new)


def own_variables(layer) -> list:
    """The variables `layer` created itself, not its sublayers' (Keras 3.15
    `Layer._trainable_variables` + `Layer._non_trainable_variables`)."""
    what = "Keras' Layer._trainable_variables / _non_trainable_variables"
    return list(attr(layer, "_trainable_variables", what)) + list(
        attr(layer, "_non_trainable_variables", what)
    )


def forget_own_variables(layer):
    """Empties Keras' lists of the variables `layer` owns (Keras 3.15
    `Layer._trainable_variables`, `_non_trainable_variables`), and the
    tracker's `stored_ids["variables"]` where a Keras version has that
    store (3.15 has none)."""
    for store in ("_trainable_variables", "_non_trainable_variables"):
        variables = getattr(layer, store, None)
        if isinstance(variables, list):
            del variables[:]
    tracker = getattr(layer, "_tracker", None)
    if tracker is not None and "variables" in tracker.stored_ids:
        tracker.stored_ids["variables"].clear()


def forget_checkpoint_variables(layer):
    """Drops the references to variables that `layer`, as a TensorFlow
    checkpoint object, holds (TF 2.21 `AutoTrackable`
    `_self_unconditional_dependency_names` /
    `_self_unconditional_checkpoint_dependencies`; a Keras variable's
    `tf.Variable` carries `_keras_variable`)."""

    def is_variable(value):
        return isinstance(value, keras.Variable) or hasattr(
            value, "_keras_variable"
        )

    names = vars(layer).get("_self_unconditional_dependency_names")
    if isinstance(names, dict):
        for key in [k for k, v in names.items() if is_variable(v)]:
            dict.__delitem__(names, key)
    refs = vars(layer).get("_self_unconditional_checkpoint_dependencies")
    if isinstance(refs, list):
        refs[:] = [r for r in refs if not is_variable(getattr(r, "ref", None))]


@contextlib.contextmanager
def unlocked_state(layer):
    """Lets a built (locked) layer create variables, as Keras' own
    `enable_lora()` does (Keras 3.15 `Layer._tracker.locked`, `unlock()`,
    `lock()`); restores the lock on exit."""
    tracker = _tracker(layer)
    was_locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if was_locked:
            tracker.lock()


def flatten_layers(layer, include_self=True) -> list:
    """`layer` (if `include_self`) and all its sublayers, recursively
    (Keras 3.15 `Layer._flatten_layers`)."""
    return list(
        attr(layer, "_flatten_layers", "Keras' Layer._flatten_layers()")(
            include_self=include_self
        )
    )
