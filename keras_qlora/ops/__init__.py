"""The single entry point for every 4-bit matmul in keras_qlora.

Layers call `nf4_matmul`; nothing else multiplies by an NF4 weight. Today it
runs the pure `keras.ops` reference (dequantize, then matmul). The fused
TensorFlow op (custom_ops/) plugs in here without any change to the layers.

On TensorFlow the product carries its own gradient: the input gradient is
the transposed product `dy @ W^T`, dequantizing again in the backward pass,
so autodiff never keeps a layer's float kernel alive from the forward pass
to the backward pass (which would undo the memory QLoRA saves). No gradient
flows to the 4-bit state.
"""

import keras

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
    state = (packed, absmax, absmax_scale, absmax_offset)
    if keras.backend.backend() != "tensorflow":
        return nf4_matmul_reference(
            x, *state, shape, block_size, transpose=transpose
        )
    return _tf_nf4_matmul(x, state, shape, block_size, transpose)


def _tf_nf4_matmul(x, state, shape, block_size, transpose):
    import tensorflow as tf

    # Read variables outside the custom-gradient function, behind
    # stop_gradient: it then closes over constants, the forward ops record
    # nothing on an eager tape (so they keep no float kernel alive), and no
    # gradient can reach the 4-bit state.
    state = tuple(
        None if t is None else tf.stop_gradient(tf.convert_to_tensor(t))
        for t in state
    )

    def product(inputs, flip):
        return nf4_matmul_reference(
            inputs, *state, shape, block_size, transpose=flip
        )

    @tf.custom_gradient
    def forward(inputs):
        def grad(dy):
            return product(dy, not transpose)

        return product(tf.stop_gradient(inputs), transpose), grad

    return forward(x)
