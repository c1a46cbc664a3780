"""Helpers shared by the `apply()` cases (cases_apply*.py): the small float
models, the calls that must be refused or must work, and the checks that a
refused call left the model as it was.
"""

import keras

import keras_qlora

from .catalog import Case
from .catalog import Correct
from .catalog import Refused

Settings = keras_qlora.QLoRASettings


def _no(entry, name, run, error, match, *names):
    """A case that must be refused with `error`."""
    return Case(entry, name, run, Refused(error, match, names))


def _ok(entry, name, run):
    """A case that must work; `run` asserts the result."""
    return Case(entry, name, run, Correct())


def _call(fn, *args, **kwargs):
    return lambda tmp: fn(*args, **kwargs)


# -- models -------------------------------------------------------------------


def _float_model():
    """Three small Dense layers: query [32, 48], value [48, 40], head."""
    return keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(48, name="query"),
            keras.layers.Dense(40, name="value"),
            keras.layers.Dense(8, name="head"),
        ],
        name="float_model",
    )


def _apply(**kwargs):
    """`apply()` of `_float_model()` with LoRA rank 4 on query and value."""
    kwargs = {"rank": 4, "target_modules": ["query", "value"], **kwargs}
    return keras_qlora.apply(_float_model(), **{"verbose": False, **kwargs})


def _dense(units=16, k=32, built=True):
    dense = keras.layers.Dense(units, name="dense")
    if built:
        dense.build((None, k))
    return dense


# -- messages the cases match ----------------------------------------------

_BOOL = r"must be True or False"
_BLOCKS = r"one of \(32, 64, 128, 256\)"
