"""The single entry point for every 4-bit matmul in keras_qlora.

Layers call `nf4_matmul`; nothing else multiplies by an NF4 weight. Today it
runs the pure `keras.ops` reference (dequantize, then matmul). The fused
TensorFlow op (custom_ops/) plugs in here without any change to the layers.
"""

from keras_qlora.ops.reference import dequantize_transposed
from keras_qlora.ops.reference import nf4_matmul_reference


def active_path() -> tuple:
    """Returns `(name, reason)` of the implementation `nf4_matmul` uses."""
    return (
        "reference",
        "pure keras.ops dequantize + matmul (the fused op is not built yet)",
    )


def nf4_matmul(
    x,
    packed,
    absmax,
    absmax_scale,
    absmax_offset,
    shape,
    block_size,
    transpose=False,
):
    """Computes `x @ W` (or `x @ W^T` with `transpose=True`) for NF4 `W`.

    Args:
        x: float32 / float16 / bfloat16 tensor of rank >= 2, last axis K
            (N when `transpose`).
        packed: uint8 packed 4-bit indices, `ceil(K * N / 2)` bytes.
        absmax: float32 block scales, or uint8 codes with double quant.
        absmax_scale: float32 per-256-block scales (double quant) or None.
        absmax_offset: float32 scalar offset (double quant) or None.
        shape: logical kernel shape `(K, N)`.
        block_size: quantization block size.
        transpose: multiply by `W^T` (used for input gradients).

    Returns:
        A tensor of x's dtype with last axis N (K when `transpose`).
    """
    return nf4_matmul_reference(
        x,
        packed,
        absmax,
        absmax_scale,
        absmax_offset,
        shape,
        block_size,
        transpose=transpose,
    )


__all__ = ["active_path", "dequantize_transposed", "nf4_matmul"]
