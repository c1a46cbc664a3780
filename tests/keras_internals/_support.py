"""Helpers shared by the tests of `keras_qlora.internals`."""

import keras


def changed(function, behaviour):
    return (
        f"Keras/TF behaviour changed: {behaviour}. Update "
        f"keras_qlora.internals.{function} (and check the pinned range in "
        "setup.cfg)."
    )


def functional(units=2):
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(units, name="dense")
    outputs = keras.layers.Dense(1, name="head")(dense(inputs))
    return keras.Model(inputs, outputs), dense


class Outer(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(2, name="first")
        self.second = keras.layers.Dense(2, name="second")

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones", name="s")
        self.first.build(input_shape)
        self.second.build((None, 2))

    def call(self, x):
        return self.second(self.first(x)) * self.scale


def built_outer():
    outer = Outer()
    outer.build((None, 3))
    return outer


def built_sgd(*variables, **kwargs):
    optimizer = keras.optimizers.SGD(**kwargs)
    optimizer.build(list(variables))
    return optimizer
