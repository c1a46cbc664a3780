"""The one validation of `nf4_matmul`'s inputs, for both of its paths.

The C++ op checks every buffer (custom_ops/kernels/nf4_matmul_args.h); the
pure TensorFlow path (`KERAS_QLORA_PURE_TF=1`, or no library) used to check
nothing, so a short `packed`, a uint8 `absmax` without its scale, or a
float `absmax` with a stray scale gave wrong numbers there. `nf4_matmul`
runs these checks before choosing a path, with the op's messages, so both
paths refuse the same inputs the same way. Only static shapes are checked
here (a dimension unknown while tracing is left to the op, or to the
reference's own shape errors).
"""

import numpy as np

from keras_qlora.quantizers.state import NESTED_BLOCK_SIZE
from keras_qlora.quantizers.state import check_block_size
from keras_qlora.quantizers.state import check_quant_type
from keras_qlora.quantizers.state import num_blocks
from keras_qlora.quantizers.state import packed_bytes


def check_inputs(x, weight, transpose):
    """Raises ValueError (naming the input, with the op's message) when `x`
    or the `NF4Tensors` `weight` cannot be multiplied, and TypeError when
    `transpose` is not a bool (a string is truthy: "no" would transpose)."""
    if not isinstance(transpose, (bool, np.bool_)):
        raise TypeError(
            "nf4_matmul: transpose must be a bool (True or False). "
            f"Received: transpose={transpose!r}"
        )
    k, n = _shape(weight)
    quant_type = _quant_type(weight.quant_type)
    if quant_type == "int8":
        _int8_block_size(weight.block_size, k)
    else:
        _block_size(weight.block_size)
    count = k * n
    blocks = num_blocks(count, weight.block_size)
    packed, absmax, scale, offset = weight.arrays()
    if quant_type == "int8" and _dtype(absmax) == "uint8":
        raise ValueError(
            "NF4Matmul: quant_type=int8 takes float32 absmax (one scale per "
            "row of W^T); it has no double quantization. Received: uint8 "
            "absmax"
        )
    size = packed_bytes(count, quant_type)
    rule = "k * n" if quant_type == "int8" else "ceil(k * n / 2)"
    _sized(
        "packed",
        packed,
        size,
        f"{rule} = {size} bytes for k={k}, n={n}, quant_type={quant_type}",
    )
    _sized(
        "absmax",
        absmax,
        blocks,
        f"ceil(k * n / block_size) = {blocks} "
        f"entries for k={k}, n={n}, block_size={weight.block_size}",
    )
    double = _dtype(absmax) == "uint8"
    if double and (scale is None or offset is None):
        raise ValueError(
            "NF4Matmul: with uint8 absmax (double quantization), "
            "absmax_scale and absmax_offset are required. Received: "
            f"absmax_scale={_describe(scale)}, absmax_offset="
            f"{_describe(offset)}"
        )
    if not double and (scale is not None or offset is not None):
        raise ValueError(
            "NF4Matmul: float32 absmax (no double quantization) takes no "
            f"absmax_scale / absmax_offset. Received: absmax_scale="
            f"{_describe(scale)}, absmax_offset={_describe(offset)}"
        )
    if double:
        nested = num_blocks(blocks, NESTED_BLOCK_SIZE)
        _sized(
            "absmax_scale",
            scale,
            nested,
            f"ceil(blocks / 256) = {nested} entries",
        )
        if _static_shape(offset) not in (None, ()):
            raise ValueError(
                "NF4Matmul: absmax_offset must be a scalar. Received shape "
                f"{_static_shape(offset)}"
            )
    _check_x(x, k, n, transpose)


def _shape(weight):
    shape = tuple(weight.shape)
    if len(shape) != 2 or any(
        isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1
        for d in shape
    ):
        raise ValueError(
            "NF4Matmul: weight.shape must be two ints (k, n), both >= 1. "
            f"Received: weight.shape={weight.shape!r}"
        )
    return tuple(int(d) for d in shape)


def _quant_type(quant_type):
    try:
        return check_quant_type(quant_type, "weight.quant_type")
    except (TypeError, ValueError) as err:
        raise ValueError(f"NF4Matmul: {err}") from None


def _int8_block_size(block_size, k):
    if isinstance(block_size, bool) or block_size != k:
        raise ValueError(
            "NF4Matmul: with quant_type=int8 every row of W^T has one scale, "
            f"so block_size must equal k={k}. Received: block_size="
            f"{block_size!r}"
        )


def _block_size(block_size):
    try:
        check_block_size(block_size)
    except (TypeError, ValueError) as err:
        raise ValueError(f"NF4Matmul: {err}") from None


def _check_x(x, k, n, transpose):
    shape = _static_shape(x)
    if shape is None:
        return
    if len(shape) < 2:
        raise ValueError(
            f"NF4Matmul: x must have rank >= 2. Received shape {shape}"
        )
    want = n if transpose else k
    if shape[-1] is not None and shape[-1] != want:
        raise ValueError(
            f"NF4Matmul: the last axis of x must be "
            f"{'n' if transpose else 'k'}={want}. Received shape {shape}"
        )


def _sized(name, value, size, what):
    shape = _static_shape(value)
    if shape is None or (len(shape) == 1 and shape[0] in (None, size)):
        return
    raise ValueError(
        f"NF4Matmul: {name} must be 1-D with {what}. Received shape {shape}"
    )


def _static_shape(value):
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(None if d is None else int(d) for d in shape)
    except TypeError:  # unknown rank while tracing
        return None


def _dtype(value):
    dtype = getattr(value, "dtype", None)
    return getattr(dtype, "name", str(dtype))


def _describe(value):
    if value is None:
        return "None"
    return f"{_dtype(value)}{list(_static_shape(value) or [])}"
