"""Block-wise 8-bit quantization of optimizer moments.

A flat tensor is cut into blocks of `block_size` values; a block stores one
float32 absmax and one uint8 code per value, the index of the nearest entry
of a 256-entry dynamic map (`keras_qlora.quantizers.codes`) to
`value / absmax`, as bitsandbytes' blockwise quantizer for its 8-bit
optimizers. `AdamW8bit` keeps its moments this way.
"""

import math

import numpy as np
import tensorflow as tf

from keras_qlora.training.checks import check_count
from keras_qlora.training.checks import check_table


def quantize_blockwise_8bit(values, midpoints, block_size: int):
    """Quantizes a tensor blockwise to uint8 codes of a 256-entry map.

    Args:
        values: a float tensor of any shape; it is flattened row-major.
        midpoints: the 255 sorted decision boundaries of the code table
            (`codes.dynamic_map_midpoints()` or the unsigned variant).
        block_size: values per block; the last block may be partial.

    Returns:
        `(codes, absmax)`: uint8 `[size]` and float32 `[ceil(size / bs)]`.
        A block holding NaN or Inf gets a non-finite absmax: it dequantizes
        to non-finite values, never to finite numbers.

    Raises:
        ValueError: a bad `block_size`, or `midpoints` not of length 255.

    Example:
        >>> q, absmax = quantize_blockwise_8bit(
        ...     tf.ones((300,)), codes.dynamic_map_midpoints(), 256)
        >>> tuple(q.shape), tuple(absmax.shape)
        ((300,), (2,))
    """
    check_count("block_size", block_size, minimum=1)
    check_table("midpoints", midpoints, 255)
    # Raw TF ops, not keras.ops: this runs once per variable per step and
    # keras.ops' generic wrappers add several times the graph nodes, which
    # made tracing a train step seconds slower.
    flat = tf.reshape(tf.cast(values, tf.float32), [-1])
    size = flat.shape[0]
    blocks = _as_blocks(flat, size, block_size)  # (blocks, block_size)
    absmax = tf.reduce_max(tf.abs(blocks), axis=1)
    # An all-zero block keeps absmax 0 (it dequantizes to 0 whatever the
    # codes); dividing by 1 instead avoids 0 / 0.
    safe = tf.where(absmax > 0, absmax, tf.ones_like(absmax))
    normed = tf.clip_by_value(blocks / tf.expand_dims(safe, 1), -1.0, 1.0)
    # Nearest code = number of midpoints below the value; ties go down, as
    # in `quantizers.nf4` and bitsandbytes' reference (torch.bucketize).
    # `LowerBound` is what `tf.searchsorted(side="left")` runs; called on
    # the 2-D shapes it wants, it skips the wrapper's reshapes and shape
    # arithmetic (a dozen graph nodes per moment per variable). The padding
    # is cut after the search.
    index = tf.raw_ops.LowerBound(
        sorted_inputs=tf.constant(np.reshape(midpoints, (1, -1)), tf.float32),
        values=tf.reshape(normed, [1, -1]),
    )
    return tf.cast(_unblock(index, size), tf.uint8), absmax


def dequantize_blockwise_8bit(q, absmax, code, block_size: int):
    """Inverse of `quantize_blockwise_8bit`: `code[q] * absmax[block]`.

    Args:
        q: uint8 codes `[size]`.
        absmax: float32 scales `[ceil(size / block_size)]`.
        code: the 256-entry code table that produced `q`.
        block_size: the block size that produced `q`.

    Returns:
        float32 values `[size]`.

    Raises:
        ValueError: a bad `block_size`, `code` not of length 256, `q` not
            1-D, or `absmax` not of length `ceil(size / block_size)`.
    """
    check_count("block_size", block_size, minimum=1)
    check_table("code", code, 256)
    q = tf.convert_to_tensor(q)
    absmax = tf.convert_to_tensor(absmax)
    if q.shape.rank != 1:
        raise ValueError(
            f"dequantize_blockwise_8bit: `q` must be 1-D (the codes of a "
            f"flattened tensor). Received: q of shape {q.shape}"
        )
    size = q.shape[0]
    blocks = None if size is None else math.ceil(size / block_size)
    if absmax.shape.rank != 1 or absmax.shape[0] not in (None, blocks):
        raise ValueError(
            f"dequantize_blockwise_8bit: `absmax` must hold one scale per "
            f"block: shape ({blocks},) for {size} codes in blocks of "
            f"{block_size}. Received: absmax of shape {absmax.shape}"
        )
    values = tf.gather(tf.constant(code, tf.float32), tf.cast(q, tf.int32))
    blocks = _as_blocks(values, size, block_size)
    return _unblock(blocks * tf.expand_dims(absmax, 1), size)


def _as_blocks(flat, size: int, block_size: int):
    """`[size]` -> `[ceil(size / block_size), block_size]`, zero padded."""
    padded = math.ceil(size / block_size) * block_size
    if padded != size:
        flat = tf.pad(flat, [[0, padded - size]])
    return tf.reshape(flat, [padded // block_size, block_size])


def _unblock(blocks, size: int):
    """Inverse of `_as_blocks`: flatten and drop the padding."""
    flat = tf.reshape(blocks, [-1])
    return flat if flat.shape[0] == size else flat[:size]
