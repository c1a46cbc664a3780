"""Variable paths of a layer that replaces another.

Keras 3 gives a variable its path (`transformer_layer_0/self_attention/
query/kernel`) when it is created, from the name scopes open at that time:
a layer built inside its parent's `call` gets the parent's path as prefix.
keras_qlora builds its replacement layers on their own, outside any scope,
so their variables would be `query/lora_a` in every block. A layer that
remembers a parent path (Keras' `Layer._parent_path`, set the first time
the layer opens its name scope) creates all its variables under it, in
`build` and later (`add_adapter`); `adopt_parent_path` gives the new layer
the parent path of the layer it replaces before it is built.
"""

from keras_qlora import internals


def adopt_parent_path(new, old):
    """Makes `new` create its variables where `old`'s live.

    Call before `new` is built. `new` and `old` have the same name, so
    `old`'s `<parent path>/<name>/kernel` becomes
    `<parent path>/<name>/lora_a` and so on.
    """
    parent = parent_path(old)
    if parent is not None:
        internals.set_parent_path(new, parent)


def parent_path(layer):
    """The path above `layer` in its variables' paths, or None if unknown.

    Read off the layer's own variables (`a/b/<name>/kernel` gives `a/b`);
    a layer without them gives the parent path Keras recorded, if any.
    """
    for variable in layer.weights:
        head, _, tail = variable.path.rpartition("/")
        if tail != variable.name:
            continue
        if head == layer.name:
            return ""
        if head.endswith("/" + layer.name):
            return head[: -len(layer.name) - 1]
    return internals.parent_path(layer)
