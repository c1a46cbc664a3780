"""Reading and checking bitsandbytes state_dict entries (numpy only).

Shared by the 4-bit (`bitsandbytes.py`) and int8 (`bnb_int8.py`)
converters and the whole-model converter: entries may be numpy arrays,
torch tensors (anything with `.detach()`; torch is never imported) or
bytes; every error names the key.
"""

import numpy as np


def check_prefix(prefix):
    if not isinstance(prefix, str):
        raise TypeError(
            "prefix must be the key of the weight, a string such as "
            f"'weight'. Received: prefix={prefix!r}"
        )
    if not prefix:
        raise ValueError(
            "prefix must be the non-empty key of the weight, e.g. 'weight'. "
            f"Received: prefix={prefix!r}"
        )


def check_finite(values, key):
    if not np.isfinite(values).all():
        raise ValueError(
            f"from_bitsandbytes: '{key}' must be finite. Received "
            f"{int(np.sum(~np.isfinite(values)))} NaN/Inf values."
        )


def entry(state_dict, prefix, name, dtype, shape=None):
    """Entry `prefix.name` (`prefix` when name is None) as checked numpy."""
    key = prefix if name is None else f"{prefix}.{name}"
    if key not in state_dict:
        raise ValueError(
            f"from_bitsandbytes: missing key '{key}'. Received keys under "
            f"'{prefix}': {keys_under(state_dict, prefix)}"
        )
    value = tensor_to_numpy(state_dict[key], key)
    if value.dtype != dtype or (shape is not None and value.shape != shape):
        want = np.dtype(dtype).name
        raise ValueError(
            f"from_bitsandbytes: '{key}' must be {want} with shape "
            f"{list(shape) if shape is not None else 'any'}. "
            f"Received: {describe(value)}"
        )
    return value


def tensor_to_numpy(value, key):
    """A state-dict value (torch tensor, bytes, array-like) as numpy;
    `key` names it in errors.

    Raises:
        TypeError: a value that is not numeric data.
    """
    if hasattr(value, "detach"):  # a torch tensor; no torch import needed
        try:
            value = value.detach().cpu().numpy()
        except (TypeError, RuntimeError) as err:
            raise TypeError(
                f"from_bitsandbytes: cannot read '{key}' as a numpy array "
                f"(dtype={getattr(value, 'dtype', '?')}): {err}"
            ) from None
    if isinstance(value, (bytes, bytearray)):
        return np.frombuffer(bytes(value), dtype=np.uint8)
    value = np.asarray(value)
    if value.dtype == object:
        raise TypeError(
            f"from_bitsandbytes: '{key}' must be an array. Received: "
            f"{type(value).__name__} of objects"
        )
    return value


def keys_under(state_dict, prefix):
    dotted = prefix + "."
    return sorted(
        str(k) for k in state_dict if k == prefix or str(k).startswith(dotted)
    )


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def describe(value):
    arr = np.asarray(value)
    return f"array(shape={list(arr.shape)}, dtype={arr.dtype})"
