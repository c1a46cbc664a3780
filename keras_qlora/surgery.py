"""Finding layers wherever they live in a model, and swapping them in place.

A layer can be held by a Sequential's layer list, a Functional graph, a
plain attribute (an attention layer's query projection), or a list attribute
(`backbone.transformer_layers`) — often several at once. `walk` finds every
layer with all the places that hold it; `replace` updates all of them, so no
reference to the float layer (and its kernel) survives.

Keras 3 locks a built layer's state; like Keras' own `quantize()`, we edit
the tracker directly (`replace_tracked_value`), which keeps the order of
`layer.weights` and does not need the lock lifted.
"""

import dataclasses

import keras

from keras_qlora import internals


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
        internals.replace_tracked_layer(parent, old, new_layer)
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
            layers = internals.sequential_layers(parent)
            list.__setitem__(layers, _index_by_id(layers, old), new_layer)
            rebuild.append(parent)
    for sequential in rebuild:
        internals.rebuild_sequential(sequential)
    release_variables(old)


def release_variables(layer):
    """Drops every reference `layer` holds to its own variables.

    Stale graph nodes (a rebuilt Sequential, other layers' node history) can
    keep a replaced layer object alive; emptying it makes sure its float
    kernel is freed all the same. The layer must not be used afterwards.
    """
    internals.forget_own_variables(layer)
    for key, value in list(vars(layer).items()):
        if isinstance(value, keras.Variable):
            object.__setattr__(layer, key, None)
    # On TensorFlow, layers are also tf.train checkpoint objects that keep
    # their own references to the variables they own.
    internals.forget_checkpoint_variables(layer)


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
        for layer in internals.sequential_layers(parent):
            if not isinstance(layer, keras.layers.InputLayer):
                slots.append((Slot(parent, "sequential"), layer))
    elif internals.is_functional(parent):
        for layer in parent.layers:
            if not isinstance(layer, keras.layers.InputLayer):
                slots.append((Slot(parent, "functional"), layer))
    for key, value in list(vars(parent).items()):
        if internals.is_bookkeeping_attr(key):
            continue
        if isinstance(value, keras.layers.Layer):
            slots.append((Slot(parent, "attr", key=key), value))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, keras.layers.Layer):
                    slots.append((Slot(parent, "item", key=key, index=i), item))
    return slots


def _rewire_functional(model, old, new):
    """Points every graph node of `old` in `model` at `new`."""
    if internals.inbound_nodes(new):
        raise ValueError(
            f"Layer '{new.name}' is already connected in a graph; cannot "
            "swap it into a Functional model."
        )
    internals.move_graph_nodes(old, new)
    # Recompute the graph bookkeeping (node keys hold operation ids).
    internals.recompute_functional_graph(model)
