"""Finding layers wherever they live in a model, and swapping them in place.

A layer can be held by a Sequential's layer list, a Functional graph, a
plain attribute (`attention._query_dense`), or a list attribute
(`backbone.transformer_layers`) — often several at once. `walk` finds every
layer with all the places that hold it; `replace` updates all of them, so no
reference to the float layer (and its kernel) survives.

Keras 3 locks a built layer's state; like Keras' own `quantize()`, we edit
the tracker directly (`replace_tracked_value`), which keeps the order of
`layer.weights` and does not need the lock lifted.
"""

import dataclasses

import keras
from keras.src.models.functional import Functional
from keras.src.ops.function import map_graph
from keras.src.ops.node import KerasHistory

# Attributes that hold Keras bookkeeping, not the model's structure.
_SKIP_ATTRS = frozenset(
    {
        "_tracker",
        "_layers",
        "_operations",
        "_inbound_nodes",
        "_outbound_nodes",
        "_functional",
        "_nodes_by_depth",
        "_operations_by_depth",
        "_nodes",
    }
)


@dataclasses.dataclass
class Slot:
    """One place that holds a layer: `kind` is attr, item, sequential or
    functional; `key` the attribute name (attr/item), `index` the list
    position (item)."""

    parent: object
    kind: str
    key: str = None
    index: int = None


@dataclasses.dataclass
class Found:
    """A layer, its path of layer names from the root, and its slots."""

    path: str
    layer: object
    slots: list


def walk(root):
    """Returns every layer under `root` (not `root` itself), parents first.

    Each layer appears once, with the path of the first route found and the
    list of all slots that hold it.
    """
    found = {}
    order = []
    stack = [(root, "")]
    visited = {id(root)}
    while stack:
        parent, prefix = stack.pop(0)
        for slot, child in _child_slots(parent):
            entry = found.get(id(child))
            if entry is None:
                path = f"{prefix}/{child.name}" if prefix else child.name
                entry = Found(path=path, layer=child, slots=[])
                found[id(child)] = entry
                order.append(entry)
            entry.slots.append(slot)
            if id(child) not in visited:
                visited.add(id(child))
                stack.append((child, entry.path))
    return order


def replace(entry: Found, new_layer):
    """Puts `new_layer` in every slot that holds `entry.layer`."""
    old = entry.layer
    rebuild = []
    for slot in entry.slots:
        parent = slot.parent
        _replace_tracked(parent, old, new_layer)
        if slot.kind == "attr":
            object.__setattr__(parent, slot.key, new_layer)
        elif slot.kind == "item":
            container = getattr(parent, slot.key)
            if isinstance(container, tuple):
                items = list(container)
                items[slot.index] = new_layer
                object.__setattr__(parent, slot.key, type(container)(items))
            else:
                list.__setitem__(container, slot.index, new_layer)
        elif slot.kind == "functional":
            _rewire_functional(parent, old, new_layer)
        elif slot.kind == "sequential":
            # Sequential.build() rebinds _layers, so the list the tracker
            # holds may not be the one Sequential reads.
            layers = parent._layers
            list.__setitem__(layers, _index_by_id(layers, old), new_layer)
            rebuild.append(parent)
    for sequential in rebuild:
        sequential._maybe_rebuild()
    release_variables(old)


def release_variables(layer):
    """Drops every reference `layer` holds to its own variables.

    Stale graph nodes (a rebuilt Sequential, other layers' node history) can
    keep a replaced layer object alive; emptying it makes sure its float
    kernel is freed all the same. The layer must not be used afterwards.
    """
    for store in ("_trainable_variables", "_non_trainable_variables"):
        variables = getattr(layer, store, None)
        if isinstance(variables, list):
            del variables[:]
    tracker = getattr(layer, "_tracker", None)
    if tracker is not None and "variables" in tracker.stored_ids:
        tracker.stored_ids["variables"].clear()
    for key, value in list(vars(layer).items()):
        if isinstance(value, keras.Variable):
            object.__setattr__(layer, key, None)
    # On TensorFlow, layers are also tf.train checkpoint objects that keep
    # their own references to the variables they own.
    names = vars(layer).get("_self_unconditional_dependency_names")
    if isinstance(names, dict):
        for key in [k for k, v in names.items() if _is_variable(v)]:
            dict.__delitem__(names, key)
    refs = vars(layer).get("_self_unconditional_checkpoint_dependencies")
    if isinstance(refs, list):
        refs[:] = [r for r in refs if not _is_variable(getattr(r, "ref", None))]


def _is_variable(value):
    return isinstance(value, keras.Variable) or hasattr(
        value, "_keras_variable"
    )


def _index_by_id(items, value):
    for i, item in enumerate(items):
        if item is value:
            return i
    raise ValueError(f"{value!r} not found")


def _child_slots(parent):
    slots = []
    if not isinstance(parent, keras.layers.Layer):
        return slots
    if isinstance(parent, keras.Sequential):
        for layer in parent._layers:
            if not isinstance(layer, keras.layers.InputLayer):
                slots.append((Slot(parent, "sequential"), layer))
    elif isinstance(parent, Functional):
        for layer in parent.layers:
            if not isinstance(layer, keras.layers.InputLayer):
                slots.append((Slot(parent, "functional"), layer))
    for key, value in list(vars(parent).items()):
        if key in _SKIP_ATTRS:
            continue
        if isinstance(value, keras.layers.Layer):
            slots.append((Slot(parent, "attr", key=key), value))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, keras.layers.Layer):
                    slots.append((Slot(parent, "item", key=key, index=i), item))
    return slots


def _replace_tracked(parent, old, new):
    tracker = getattr(parent, "_tracker", None)
    if tracker is None:
        return
    if tracker.is_in_store("layers", old):
        if tracker.is_in_store("layers", new):
            tracker.untrack(old)
        else:
            tracker.replace_tracked_value("layers", old, new)


def _rewire_functional(model, old, new):
    """Points every graph node of `old` in `model` at `new`."""
    if new._inbound_nodes:
        raise ValueError(
            f"Layer '{new.name}' is already connected in a graph; cannot "
            "swap it into a Functional model."
        )
    new._inbound_nodes = list(old._inbound_nodes)
    new._outbound_nodes = list(old._outbound_nodes)
    for node in new._inbound_nodes:
        node.operation = new
        for tensor in node.outputs:
            history = tensor._keras_history
            if history.operation is old:
                tensor._keras_history = KerasHistory(
                    new, history.node_index, history.tensor_index
                )
    old._inbound_nodes = []
    old._outbound_nodes = []
    # Recompute the graph bookkeeping (node keys hold operation ids).
    nodes, by_depth, operations, ops_by_depth = map_graph(
        model._inputs, model._outputs
    )
    model._nodes = nodes
    model._nodes_by_depth = by_depth
    model._operations = operations
    model._operations_by_depth = ops_by_depth
