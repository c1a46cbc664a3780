"""Creating the frozen 4-bit variables under multi-worker tf.distribute.

`MultiWorkerMirroredStrategy` broadcasts every new variable's initial value
from the chief with collective ops, which accept only bool, float16/32/64
and int32/64: a uint8 variable (packed NF4 codes, 8-bit block scales)
fails to be created ("Value for attr 'T' of uint8 is not in the list of
allowed values"). Those variables are frozen and every worker fills them
with the same bytes (quantized from the same weights, or loaded from the
same file), so they need neither the broadcast nor synchronization: under
a multi-worker strategy they are created as plain variables local to the
worker. Under single-worker strategies (MirroredStrategy) nothing changes.
"""

import contextlib

import tensorflow as tf

from keras_qlora import internals

# Dtypes the collective broadcast of initial values cannot carry.
_NOT_BROADCASTABLE = (tf.uint8, tf.int8, tf.uint16, tf.int16)


@contextlib.contextmanager
def frozen_variable_scope():
    """Context for creating frozen integer variables (see module doc)."""
    if not _multi_worker():
        yield
        return
    with tf.variable_creator_scope(_local_creator):
        yield


def _multi_worker():
    if not tf.distribute.has_strategy():
        return False
    # Collective strategies expose the worker count; others are local.
    return internals.num_workers(tf.distribute.get_strategy()) > 1


def _local_creator(next_creator, **kwargs):
    dtype = kwargs.get("dtype")
    if dtype is None or tf.as_dtype(dtype) not in _NOT_BROADCASTABLE:
        return next_creator(**kwargs)
    if kwargs.get("trainable"):
        raise ValueError(
            f"Variable '{kwargs.get('name')}' of dtype {dtype} cannot be "
            "trainable under a multi-worker strategy."
        )
    # Constructing the variable class directly skips the strategy's
    # creator (and so its broadcast).
    return internals.local_resource_variable(
        initial_value=kwargs.get("initial_value"),
        name=kwargs.get("name"),
        dtype=dtype,
        shape=kwargs.get("shape"),
    )
