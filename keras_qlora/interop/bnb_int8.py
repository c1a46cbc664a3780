"""int8 states <-> bitsandbytes `Linear8bitLt` state_dict entries.

A `Linear8bitLt(has_fp16_weights=False)` on its device saves, under its
module prefix (`weight` being its weight's key):

    weight          int8 [N, K], the codes CB (row-major, torch's layout)
    SCB             float32 [N], one absmax per output row
    weight_format   uint8 scalar, 0 ("row"; the only layout bitsandbytes
                    still writes)

An int8 `NF4State` holds exactly these bytes (`packed` = CB's bit patterns,
`absmax` = SCB), so converting renames and validates, never requantizes.
"""

import numpy as np

from keras_qlora.interop.bnb_values import check_finite
from keras_qlora.interop.bnb_values import entry
from keras_qlora.interop.bnb_values import keys_under
from keras_qlora.interop.bnb_values import tensor_to_numpy
from keras_qlora.quantizers.state import NF4State

_WEIGHT = "weight"
# bitsandbytes' weight_format codes; only row-major (0) is read.
_ROW_MAJOR = 0


def module_prefix(prefix: str) -> str:
    """The module part of a weight key ("a.b.weight" -> "a.b.").

    Raises:
        ValueError: `prefix` does not end in "weight" (SCB could not be
            named beside it).
    """
    if prefix != _WEIGHT and not prefix.endswith("." + _WEIGHT):
        raise ValueError(
            "An int8 weight's prefix must be its weight key, ending in "
            f"'weight' (SCB is stored beside it). Received: prefix={prefix!r}"
        )
    return prefix[: -len(_WEIGHT)]


def to_entries(state: NF4State, prefix: str) -> dict:
    """`Linear8bitLt` entries of an int8 state (see module doc)."""
    module = module_prefix(prefix)
    k, n = state.shape
    return {
        prefix: state.packed.view(np.int8).reshape(n, k).copy(),
        f"{module}SCB": state.absmax.copy(),
        f"{module}weight_format": np.array(_ROW_MAJOR, dtype=np.uint8),
    }


def holds_int8(state_dict, prefix: str) -> bool:
    """Whether the entry at `prefix` is an int8 weight (Linear8bitLt): int8,
    with no 4-bit quant state beside it."""
    if prefix not in state_dict:
        return False
    quant_state = f"{prefix}.quant_state."
    if any(str(key).startswith(quant_state) for key in state_dict):
        return False
    dtype = str(getattr(state_dict[prefix], "dtype", ""))
    return dtype.rsplit(".", 1)[-1] == "int8"  # numpy or torch spelling


def from_entries(state_dict, prefix: str) -> NF4State:
    """An int8 `NF4State` from `Linear8bitLt` entries, each checked.

    Raises:
        ValueError: a missing entry, a wrong dtype or shape, a non-finite
            or negative SCB, a weight_format other than row-major; each
            message names the key.
    """
    module = module_prefix(prefix)
    weight = entry(state_dict, prefix, None, np.int8)
    if weight.ndim != 2 or 0 in weight.shape:
        raise ValueError(
            f"from_bitsandbytes: '{prefix}' must be a 2-D int8 [N, K] "
            f"Linear8bitLt weight. Received: shape={list(weight.shape)}"
        )
    n, k = weight.shape
    scb_key = f"{module}SCB"
    if scb_key not in state_dict:
        raise ValueError(
            f"from_bitsandbytes: the int8 weight '{prefix}' needs its "
            f"scales '{scb_key}' (float32 [{n}]). Received keys: "
            f"{keys_under(state_dict, module.rstrip('.') or prefix)}"
        )
    scb = tensor_to_numpy(state_dict[scb_key], scb_key)
    if scb.dtype != np.float32 or scb.shape != (n,):
        raise ValueError(
            f"from_bitsandbytes: '{scb_key}' must be float32 with shape "
            f"[{n}] (one scale per output row). Received: "
            f"shape={list(scb.shape)}, dtype={scb.dtype}"
        )
    check_finite(scb, scb_key)
    if (scb < 0).any():
        raise ValueError(
            f"from_bitsandbytes: '{scb_key}' holds negative scales; SCB is "
            "each row's absmax (>= 0)."
        )
    _check_format(state_dict, f"{module}weight_format")
    return NF4State(
        packed=np.ascontiguousarray(weight).reshape(-1).view(np.uint8).copy(),
        absmax=np.ascontiguousarray(scb).copy(),
        shape=(k, n),
        block_size=k,
        quant_type="int8",
    )


def _check_format(state_dict, key):
    if key not in state_dict:
        return  # older files: row-major was the only layout saved
    value = tensor_to_numpy(state_dict[key], key)
    if value.size != 1 or int(value.reshape(-1)[0]) != _ROW_MAJOR:
        raise ValueError(
            f"from_bitsandbytes: '{key}' must be 0 (row-major), the only "
            f"layout keras_qlora reads. Received: {value.tolist()!r}"
        )
