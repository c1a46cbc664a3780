"""Quantized states <-> bitsandbytes `Linear4bit` / `Linear8bitLt` entries.

bitsandbytes saves a 4-bit Linear (NF4 or FP4) as the packed weight plus a
few entries named after it (here for the weight key `weight`):

    weight                                uint8 [ceil(N * K / 2), 1]
    weight.absmax                         uint8 codes (double quant), else
                                          float32 [blocks]
    weight.quant_map                      float32 [16], the NF4 / FP4 table
    weight.nested_absmax                  float32 [ceil(blocks / 256)]
    weight.nested_quant_map               float32 [256], the dynamic map
    weight.quant_state.bitsandbytes__nf4  uint8 bytes of a UTF-8 JSON dict:
    (or ...bitsandbytes__fp4)             quant_type, blocksize, dtype,
                                          shape, and nested_* scalars

The `nested_*` entries exist only with double quantization. int8 weights
(`Linear8bitLt`) are an int8 `weight` with `SCB` and `weight_format` beside
it; see `bnb_int8.py`. The torch weight
is `[out, in] = [N, K]`, the Keras kernel transposed; `NF4State` already
stores its bytes in that order, so converting renames and validates, and
never requantizes. Only numpy is used: torch tensors are accepted (anything
with `.detach()`), but torch is never imported, and nothing is unpickled.
"""

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from keras_qlora.interop import bnb_int8
from keras_qlora.interop.bnb_values import check_finite
from keras_qlora.interop.bnb_values import check_prefix
from keras_qlora.interop.bnb_values import describe
from keras_qlora.interop.bnb_values import entry
from keras_qlora.interop.bnb_values import is_int
from keras_qlora.interop.bnb_values import keys_under
from keras_qlora.interop.bnb_values import tensor_to_numpy
from keras_qlora.quantizers import codes
from keras_qlora.quantizers.state import ALLOWED_BLOCK_SIZES
from keras_qlora.quantizers.state import NESTED_BLOCK_SIZE
from keras_qlora.quantizers.state import NF4State
from keras_qlora.quantizers.state import num_blocks
from keras_qlora.quantizers.state import packed_bytes

_QUANT_STATE = "quant_state.bitsandbytes__"
# Dtypes a bitsandbytes weight may dequantize to; the stored state is the
# same for all three (we always dequantize to float32).
_WEIGHT_DTYPES = ("float32", "float16", "bfloat16")


def to_bitsandbytes(state_or_layer: Any, prefix: str = "weight") -> dict:
    """Converts a quantized weight to bitsandbytes state_dict entries.

    Args:
        state_or_layer: an `NF4State` (any base format), or a built
            `QLoRADense` / `QLoRAEinsumDense` (its `nf4_state()` is used;
            an EinsumDense kernel is exported as its 2-D `[K, N]` view).
        prefix: the weight's key, e.g. `"model.layers.0.mlp.up_proj.weight"`
            (for int8 it must end in "weight": `SCB` sits beside it).

    Returns:
        A dict of numpy arrays with bitsandbytes' keys (see module doc), as
        in a saved `Linear4bit` (NF4, FP4) or `Linear8bitLt` (int8)
        state_dict. For 4 bits, rebuild the torch parameter with
        `bitsandbytes.nn.Params4bit.from_prequantized` (entries converted
        with `torch.from_numpy`, prefix stripped); for int8, load them into
        a `Linear8bitLt(has_fp16_weights=False)` moved to its device.

    Raises:
        TypeError: neither an `NF4State` nor a QLoRA layer, or a non-string
            `prefix`.
        ValueError: an empty `prefix`; an int8 `prefix` not ending in
            "weight".

    Example:
    >>> import numpy as np
    >>> from keras_qlora.quantizers import quantize_nf4
    >>> sd = to_bitsandbytes(quantize_nf4(np.ones((64, 8), "float32")))
    >>> sd["weight"].shape, sd["weight.absmax"].dtype
    ((256, 1), dtype('uint8'))
    """
    state = _as_state(state_or_layer)
    check_prefix(prefix)
    if state.quant_type == "int8":
        return bnb_int8.to_entries(state, prefix)
    k, n = state.shape
    meta = {
        "quant_type": state.quant_type,
        "blocksize": state.block_size,
        "dtype": "float32",
        "shape": [n, k],
    }
    out = {
        prefix: state.packed.reshape(-1, 1).copy(),
        f"{prefix}.absmax": state.absmax.copy(),
        f"{prefix}.quant_map": np.array(
            codes.FOUR_BIT_FORMATS[state.quant_type].code, dtype=np.float32
        ),
    }
    if state.double_quant:
        out[f"{prefix}.nested_absmax"] = state.absmax_scale.copy()
        out[f"{prefix}.nested_quant_map"] = np.array(
            codes.dynamic_map(), dtype=np.float32
        )
        meta["nested_blocksize"] = NESTED_BLOCK_SIZE
        meta["nested_dtype"] = "float32"
        meta["nested_offset"] = state.absmax_offset
    blob = json.dumps(meta).encode("utf-8")
    key = f"{prefix}.{_QUANT_STATE}{state.quant_type}"
    out[key] = np.frombuffer(blob, np.uint8).copy()
    return out


def from_bitsandbytes(state_dict: Mapping, prefix: str = "weight") -> NF4State:
    """Reads a bitsandbytes weight into an `NF4State`: a `Linear4bit` (NF4
    or FP4) or, when the weight entry is int8, a `Linear8bitLt`.

    Args:
        state_dict: a mapping holding the entries listed in the module doc
            (numpy arrays or torch tensors); other keys are ignored, so a
            whole model's state_dict works.
        prefix: the weight's key, e.g. `"model.layers.0.mlp.up_proj.weight"`.

    Returns:
        An `NF4State` of the Keras kernel `[K, N]` (the torch weight
        `[N, K]` transposed); `quantizers.dequantize` of it equals
        bitsandbytes' `dequantize_4bit` (or `int8_vectorwise_dequant`)
        transposed, bit for bit.

    Raises:
        TypeError: `state_dict` is not a mapping, an entry is not an
            array, or `prefix` is not a string.
        ValueError: a missing or malformed entry, a block size keras_qlora
            does not support, or a code table that is not the format's.
            The message names the key, what it holds and what is allowed.

    Example:
    >>> import numpy as np
    >>> from keras_qlora.quantizers import quantize_nf4
    >>> state = quantize_nf4(np.ones((64, 8), "float32"))
    >>> from_bitsandbytes(to_bitsandbytes(state)).shape
    (64, 8)
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "from_bitsandbytes expects a state_dict mapping. "
            f"Received: {type(state_dict).__name__}"
        )
    check_prefix(prefix)
    if bnb_int8.holds_int8(state_dict, prefix):
        return bnb_int8.from_entries(state_dict, prefix)
    meta_key, meta = _read_meta(state_dict, prefix)
    n, k = _check_meta(meta, meta_key)
    block_size = meta["blocksize"]
    blocks = num_blocks(k * n, block_size)
    nested = _is_nested(state_dict, prefix, meta, meta_key)

    packed = entry(state_dict, prefix, None, np.uint8)
    size = packed_bytes(k * n)
    if packed.size != size or packed.ndim not in (1, 2):
        raise ValueError(
            f"from_bitsandbytes: '{prefix}' must hold ceil(N * K / 2) = "
            f"{size} bytes, shape [bytes, 1] or [bytes], for "
            f"shape [N, K] = {[n, k]}. Received: shape={packed.shape}"
        )
    quant_type = meta["quant_type"]
    _check_table(
        state_dict,
        prefix,
        "quant_map",
        codes.FOUR_BIT_FORMATS[quant_type].code,
        quant_type.upper(),
    )
    absmax_dtype = np.uint8 if nested else np.float32
    absmax = entry(state_dict, prefix, "absmax", absmax_dtype, (blocks,))
    scale = offset = None
    if nested:
        _check_table(
            state_dict,
            prefix,
            "nested_quant_map",
            codes.dynamic_map(),
            "8-bit dynamic",
        )
        nested_blocks = num_blocks(blocks, NESTED_BLOCK_SIZE)
        scale = entry(
            state_dict, prefix, "nested_absmax", np.float32, (nested_blocks,)
        )
        check_finite(scale, f"{prefix}.nested_absmax")
        offset = meta["nested_offset"]
    else:
        check_finite(absmax, f"{prefix}.absmax")
    return NF4State(
        packed=np.ascontiguousarray(packed.reshape(-1)),
        absmax=absmax,
        shape=(k, n),
        block_size=block_size,
        absmax_scale=scale,
        absmax_offset=offset,
        quant_type=quant_type,
    )


def _as_state(obj) -> NF4State:
    if isinstance(obj, NF4State):
        return obj
    # Duck-typed so this module does not import Keras layers.
    if callable(getattr(obj, "nf4_state", None)):
        return obj.nf4_state()
    raise TypeError(
        "to_bitsandbytes expects an NF4State or a built QLoRADense / "
        f"QLoRAEinsumDense. Received: {type(obj).__name__}"
    )


def _read_meta(state_dict, prefix):
    """Finds and decodes the packed `quant_state.bitsandbytes__*` entry."""
    start = f"{prefix}.{_QUANT_STATE}"
    found = sorted(k for k in state_dict if str(k).startswith(start))
    want = f"{start}nf4' or '{start}fp4"
    if len(found) != 1:
        raise ValueError(
            f"from_bitsandbytes needs exactly one key '{want}'. Received: "
            f"{found or 'none'}; keys under '{prefix}': "
            f"{keys_under(state_dict, prefix)}"
        )
    key = found[0]
    if key[len(start) :] not in codes.FOUR_BIT_FORMATS:
        raise ValueError(
            f"from_bitsandbytes: '{key}' holds a "
            f"'{key[len(start) :]}' weight; the 4-bit formats are "
            f"{tuple(codes.FOUR_BIT_FORMATS)}."
        )
    raw = tensor_to_numpy(state_dict[key], key)
    try:
        meta = json.loads(np.asarray(raw, dtype=np.uint8).tobytes())
    except (ValueError, TypeError, RecursionError) as err:
        raise ValueError(
            f"from_bitsandbytes: '{key}' must be the uint8 bytes of a UTF-8 "
            f"JSON dict. Received: {describe(raw)} ({err})"
        ) from None
    if not isinstance(meta, dict):
        raise ValueError(
            f"from_bitsandbytes: '{key}' must decode to a JSON dict. "
            f"Received: {type(meta).__name__}"
        )
    return key, meta


def _check_meta(meta, key):
    """Validates the JSON scalars; returns the torch shape `(N, K)`."""
    required = ["quant_type", "blocksize", "dtype", "shape"]
    missing = [f for f in required if f not in meta]
    if missing:
        raise ValueError(
            f"from_bitsandbytes: '{key}' lacks fields {missing}. "
            f"Received fields: {sorted(meta)}"
        )
    _check_field(meta, key, "quant_type", (key.rsplit("__", 1)[-1],))
    _check_field(meta, key, "blocksize", ALLOWED_BLOCK_SIZES)
    _check_field(meta, key, "dtype", _WEIGHT_DTYPES)
    shape = meta["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(is_int(d) and d > 0 for d in shape)
    ):
        raise ValueError(
            f"from_bitsandbytes: field 'shape' of '{key}' must be two "
            f"positive ints [N, K] (a Linear weight). Received: {shape!r}"
        )
    return int(shape[0]), int(shape[1])


def _is_nested(state_dict, prefix, meta, key):
    """Whether the weight is double quantized; checks the parts agree."""
    nested_fields = ("nested_blocksize", "nested_dtype", "nested_offset")
    nested_keys = (f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map")
    have_fields = [f for f in nested_fields if f in meta]
    have_keys = [k for k in nested_keys if k in state_dict]
    if not have_fields and not have_keys:
        return False
    if len(have_fields) != 3 or len(have_keys) != 2:
        raise ValueError(
            "from_bitsandbytes: a double-quantized weight needs keys "
            f"{list(nested_keys)} and fields {list(nested_fields)} in "
            f"'{key}'. Received keys {have_keys} and fields {have_fields}."
        )
    _check_field(meta, key, "nested_blocksize", (NESTED_BLOCK_SIZE,))
    _check_field(meta, key, "nested_dtype", ("float32",))
    offset = meta["nested_offset"]
    if not (
        isinstance(offset, (int, float))
        and not isinstance(offset, bool)
        and math.isfinite(offset)
        and abs(offset) <= float(np.finfo(np.float32).max)
    ):
        raise ValueError(
            f"from_bitsandbytes: field 'nested_offset' of '{key}' must be a "
            f"number finite in float32. Received: {offset!r}"
        )
    return True


def _check_field(meta, key, field, allowed):
    value = meta[field]
    if isinstance(allowed[0], int) and not is_int(value):
        value_ok = False  # reject 64.0 and True, which == 64 and == 1
    else:
        value_ok = value in allowed
    if not value_ok:
        raise ValueError(
            f"from_bitsandbytes: field '{field}' of '{key}' must be one of "
            f"{allowed}. Received: {field}={value!r}"
        )


def _check_table(state_dict, prefix, name, expected, what):
    key = f"{prefix}.{name}"
    table = entry(state_dict, prefix, name, np.float32, expected.shape)
    if not np.array_equal(table, expected):
        bad = int(np.sum(table != expected))
        raise ValueError(
            f"from_bitsandbytes: '{key}' must be the {what} code table "
            f"keras_qlora uses; {bad} of {expected.size} values differ. "
            f"Received: {table[:4].tolist()}..."
        )
