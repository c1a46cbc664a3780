"""The error for a moved Keras internal, and the helpers that raise it."""

import importlib

import keras
import tensorflow as tf

_SUPPORTED = (
    "The supported Keras range (and TensorFlow, keras_hub) is pinned in "
    "keras_qlora's setup.cfg."
)


class KerasInternalsChanged(RuntimeError):
    """A private Keras/TF/keras_hub name keras_qlora needs is gone."""


def changed(what, err=None):
    detail = f" ({type(err).__name__}: {err})" if err is not None else ""
    return KerasInternalsChanged(
        f"keras_qlora needs {what}; this version (keras "
        f"{keras.__version__}, tensorflow {tf.__version__}) changed it"
        f"{detail}. {_SUPPORTED}"
    )


def private(module, name, what):
    """`module.name`, imported on first use; a clear error if it moved."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise changed(f"{what} ({module}.{name})", err) from None


def attr(obj, name, what):
    """`obj.name`, or a clear error naming the Keras internal."""
    try:
        return getattr(obj, name)
    except AttributeError as err:
        raise changed(what, err) from None
