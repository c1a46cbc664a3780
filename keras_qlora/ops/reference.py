"""Pure `keras.ops` reference for the 4-bit / int8 matmul: dequantize, then
matmul.

Used when the fused op is not available and as the test oracle for it. It
materializes the float weight on every call, so it needs `K * N` floats of
temporary memory; the fused op does not.
"""

import keras
from keras import ops

from keras_qlora.quantizers import codes
from keras_qlora.quantizers.state import NESTED_BLOCK_SIZE
from keras_qlora.quantizers.state import num_blocks


def dequantize_transposed(
    packed,
    absmax,
    absmax_scale,
    absmax_offset,
    shape,
    block_size,
    quant_type="nf4",
):
    """Dequantizes the frozen variables to the float32 matrix `W^T`, `[N, K]`.

    Args:
        packed: uint8 tensor, `ceil(K * N / 2)` bytes, high nibble first
            (int8: `K * N` bytes, the codes' bit patterns).
        absmax: per-block scales: float32, or uint8 codes with double quant.
        absmax_scale: float32 scale per 256 blocks, or None.
        absmax_offset: float32 scalar, or None.
        shape: the logical kernel shape `(K, N)` (Python ints).
        block_size: elements per block (Python int; K for int8).
        quant_type: "nf4", "fp4" or "int8".

    Returns:
        float32 tensor `[N, K]`, the layout in which the bytes are stored.
    """
    k, n = shape
    if quant_type == "int8":
        return _dequantize_int8_transposed(packed, absmax, k, n)
    count = k * n
    blocks = num_blocks(count, block_size)
    as_int = ops.cast(packed, "int32")
    high = ops.right_shift(as_int, 4)
    low = ops.bitwise_and(as_int, 15)
    indices = ops.reshape(ops.stack([high, low], axis=-1), (-1,))
    table = codes.FOUR_BIT_FORMATS[quant_type].code
    values = ops.take(ops.convert_to_tensor(table), indices)
    # 2 * len(packed) >= count and block padding is even, so this is >= 0.
    pad = blocks * block_size - 2 * int(packed.shape[0])
    if pad:
        values = ops.pad(values, [[0, pad]])
    scales = block_scales(absmax, absmax_scale, absmax_offset, blocks)
    values = ops.reshape(values, (blocks, block_size)) * scales[:, None]
    values = ops.reshape(values, (-1,))[:count]
    return ops.reshape(values, (n, k))


def _dequantize_int8_transposed(packed, absmax, k, n):
    """`(code * scale) * (1 / 127)` per element, two float32 multiplies."""
    as_int = ops.cast(packed, "int32")
    signed = ops.where(as_int >= 128, as_int - 256, as_int)
    values = ops.reshape(ops.cast(signed, "float32"), (n, k))
    values = values * ops.cast(absmax, "float32")[:, None]
    return values * ops.convert_to_tensor(codes.INT8_INV_MAX)


def block_scales(absmax, absmax_scale, absmax_offset, blocks):
    """float32 per-block scales, undoing double quantization if present."""
    if absmax_scale is None:
        return ops.cast(absmax, "float32")
    table = ops.convert_to_tensor(codes.dynamic_map())
    decoded = ops.take(table, ops.cast(absmax, "int32"))
    per_block = ops.repeat(absmax_scale, NESTED_BLOCK_SIZE)[:blocks]
    return decoded * per_block + absmax_offset


def nf4_matmul_reference(x, weight, transpose=False):
    """`x @ W` (or `x @ W^T` with `transpose`) with W given as NF4 state.

    x has rank >= 2 and is float32, float16 or bfloat16; the result has x's
    dtype. `weight` is an `NF4Tensors` holding the logical `[K, N]` kernel.
    """
    w_t = dequantize_transposed(
        *weight.arrays(), weight.shape, weight.block_size, weight.quant_type
    )
    w_t = ops.cast(w_t, keras.backend.standardize_dtype(x.dtype))
    if transpose:
        return ops.matmul(x, w_t)  # (M, N) @ (N, K)
    return ops.matmul(x, ops.transpose(w_t))  # (M, K) @ (K, N)
