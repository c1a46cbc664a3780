"""Helpers shared by the training cases (cases_training_*.py): the small
models (a Sequential of two Dense layers, 8 -> 16 -> 4, LoRA on "q"),
their data, compile and fit, and their variables as numpy values.
"""

import keras
import numpy as np

import keras_qlora

# -- helpers ----------------------------------------------------------------


def _float_model(name="float_net"):
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, name="q"),
            keras.layers.Dense(4, name="head"),
        ],
        name=name,
    )


def _qlora(**options):
    options.setdefault("target_modules", ["q"])
    return keras_qlora.apply(_float_model(), rank=2, verbose=False, **options)


def _compiled(optimizer="adam", **options):
    model = _qlora(**options)
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _data(nan=False):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8)).astype("float32")
    if nan:
        x[:] = np.nan
    return x, np.ones((16, 4), "float32")


def _fit(model, epochs=1, nan=False, callbacks=()):
    x, y = _data(nan)
    return model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def _lora(model):
    return model.qlora_layers(lora_only=True)["q"]
