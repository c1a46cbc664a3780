"""Building a model whose variables hold no memory until they are needed.

Keras 3 defers a variable inside a `keras.StatelessScope`: the variable
records its shape, dtype and initializer, and TensorFlow allocates nothing
until it is initialized. keras_qlora builds a model's skeleton that way
(`from_preset`, loading a saved `QLoRAModel`), then initializes every
variable except the float kernels of the layers that become NF4: those are
never allocated. Symbolic calls (a Functional model wiring its graph) read
a deferred variable as a graph placeholder, so building works unchanged.

The private Keras names this needs (a variable's deferred value and
initializer, the registry of uninitialized variables) are reached through
`keras_qlora.internals`.
"""

import contextlib

import keras

from keras_qlora import internals


@contextlib.contextmanager
def deferred_variables():
    """Variables created inside are deferred (no memory allocated).

    Yields a list that, on exit, holds the variables created inside. On
    exit they are also taken off Keras' registry of uninitialized
    variables, so that no later `StatelessScope` initializes (allocates)
    them behind the caller's back: the caller initializes the ones it
    keeps with `initialize`.

    Example:
    >>> with deferred_variables() as created:
    ...     layer = keras.layers.Dense(4)
    ...     layer.build((None, 3))
    >>> is_deferred(layer.kernel)
    True
    >>> initialize(layer.weights)
    >>> is_deferred(layer.kernel)
    False
    """
    before = list(_registry())
    created = []
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield created
    finally:
        known = {id(v) for v in before}
        created.extend(v for v in _registry() if id(v) not in known)
        internals.set_uninitialized_variables(before)


def is_deferred(variable) -> bool:
    """True for a variable created deferred and not yet initialized."""
    return internals.is_deferred_variable(variable)


def initialize(variables):
    """Allocates and initializes the deferred ones among `variables`."""
    for variable in variables:
        if is_deferred(variable):
            internals.initialize_deferred_variable(variable)


def _registry():
    return internals.uninitialized_variables()
