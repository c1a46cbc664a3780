"""Argument checks of `AdamW8bit` and the blockwise 8-bit quantizer:
each refuses, with the argument's name, a value no step could use."""

import math
import numbers

import keras
import numpy as np
import tensorflow as tf

# Each 8-bit variable is padded to whole blocks in the update's float32
# temporaries: a larger block only costs memory (a 2**36 block would ask
# for 256 GiB at the first step).
MAX_BLOCK_SIZE = 1 << 20


def check_count(name: str, value, minimum: int) -> None:
    maximum = MAX_BLOCK_SIZE if name == "block_size" else None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        allowed = "a positive int" if minimum == 1 else "an int >= 0"
        if maximum is not None:
            allowed += f" <= {maximum}"
        raise ValueError(
            f"`{name}` must be {allowed}. Received: {name}={value!r}"
        )


def check_table(name: str, table, length: int) -> None:
    shape = np.shape(table)
    if shape != (length,):
        raise ValueError(
            f"`{name}` must be a 1-D table of {length} values. Received: "
            f"{name} of shape {shape}"
        )


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real(name: str, value, allowed: str, below_one=False) -> None:
    """Refuses a hyperparameter that no Adam step could use: not a number,
    NaN/Inf, negative, or (`below_one`) >= 1."""
    if tf.is_tensor(value) or isinstance(value, keras.Variable):
        return  # a constant tensor, as Keras' Adam accepts
    if not is_number(value):
        raise TypeError(
            f"AdamW8bit: `{name}` must be a number {allowed}. Received: "
            f"{name}={value!r} of type {type(value).__name__}"
        )
    bad = not math.isfinite(value) or value < 0
    if bad or (below_one and value >= 1):
        raise ValueError(
            f"AdamW8bit: `{name}` must be {allowed}. Received: {name}={value!r}"
        )
