"""4-bit (NF4 and FP4) quantization of 2-D kernels, vectorized in numpy.

`quantize_nf4` turns a Keras kernel `[K, N]` into an `NF4State` whose bytes
equal bitsandbytes' `quantize_4bit(W.T, blocksize, compress_statistics=True,
quant_type="nf4")` when `scale_search=False`; `quantize_4bit(...,
quant_type="fp4")` does the same for FP4; `dequantize_nf4` inverts either.
"""

from typing import Any

import numpy as np

from keras_qlora.quantizers import codes
from keras_qlora.quantizers.state import NESTED_BLOCK_SIZE
from keras_qlora.quantizers.state import NF4State
from keras_qlora.quantizers.state import check_block_size
from keras_qlora.quantizers.state import check_flag
from keras_qlora.quantizers.state import check_quant_type
from keras_qlora.quantizers.state import dequantize_absmax
from keras_qlora.quantizers.state import num_blocks

# Candidate block scales, as fractions of the block's absmax, tried by the
# MSE scale search. 1.0 (plain absmax) is always a candidate, so the search
# can only lower a block's error.
SCALE_SEARCH_GRID = np.linspace(1.0, 0.80, 11, dtype=np.float32)
# Blocks processed at once, to bound temporary memory (~64 MB at block 64).
_CHUNK_ELEMENTS = 1 << 21
# bitsandbytes clamps a zero absmax to this before taking its reciprocal.
_TINY = np.float32(1e-38)


def pack_nibbles(
    indices: np.ndarray, pad_index: int = codes.NF4_ZERO_INDEX
) -> np.ndarray:
    """Packs 4-bit indices two per byte, first element in the high nibble.

    Args:
        indices: 1-D integer array with values in [0, 15].
        pad_index: the code an odd tail is padded with: the format's 0.0
            (NF4: 7, FP4: 0), as bitsandbytes does.

    Returns:
        uint8 array of `ceil(len / 2)` bytes.
    """
    idx = np.asarray(indices, dtype=np.uint8).reshape(-1)
    if idx.size and idx.max() > 15:
        raise ValueError(
            f"pack_nibbles expects values in [0, 15]. Received max={idx.max()}"
        )
    if idx.size % 2:
        idx = np.concatenate([idx, np.array([pad_index], np.uint8)])
    return ((idx[0::2] << 4) | idx[1::2]).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of `pack_nibbles`: the first `count` 4-bit indices as uint8."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if count < 0 or count > 2 * packed.size:
        raise ValueError(
            f"unpack_nibbles: count must be in [0, {2 * packed.size}] for "
            f"{packed.size} bytes. Received: count={count}"
        )
    out = np.empty(2 * packed.size, dtype=np.uint8)
    out[0::2] = packed >> 4
    out[1::2] = packed & 0x0F
    return out[:count]


def quantize_nf4(
    kernel_2d: Any,
    block_size: int = 64,
    double_quant: bool = True,
    scale_search: bool = True,
) -> NF4State:
    """Quantizes a Keras kernel `[K, N]` to NormalFloat-4.

    Args:
        kernel_2d: float array-like of shape `[K, N]` (numpy, TF or Keras
            tensor/variable). Cast to float32 first.
        block_size: elements per block: 32, 64, 128 or 256.
        double_quant: quantize the block scales to 8 bits (block 256) as in
            QLoRA; 4.127 instead of 4.5 bits per weight at block 64.
        scale_search: pick, per block, the scale in a small grid below the
            absmax that minimizes squared reconstruction error. Same format,
            lower error; off gives bitsandbytes' exact bytes.

    Returns:
        An `NF4State`.

    Raises:
        ValueError: bad block size, not 2-D, empty, or non-finite values.
        TypeError: a non-floating kernel, or a flag that is not a bool.

    Example:
    >>> import numpy as np
    >>> state = quantize_nf4(np.random.randn(128, 64).astype("float32"))
    >>> dequantize_nf4(state).shape
    (128, 64)
    """
    return quantize_4bit(
        kernel_2d, "nf4", block_size, double_quant, scale_search
    )


def quantize_4bit(
    kernel_2d: Any,
    quant_type: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    scale_search: bool = True,
) -> NF4State:
    """Quantizes a Keras kernel `[K, N]` to NF4 or FP4 (`quant_type`).

    The same blocks, double quantization and scale search for both; only
    the code table differs. With `scale_search=False` the bytes equal
    bitsandbytes' `quantize_4bit(W.T, quant_type=quant_type)`.

    Args:
        kernel_2d: as `quantize_nf4`.
        quant_type: "nf4" or "fp4".
        block_size, double_quant, scale_search: as `quantize_nf4`.

    Returns:
        An `NF4State` with that `quant_type`.

    Raises:
        ValueError / TypeError: as `quantize_nf4`; a `quant_type` other
            than "nf4" or "fp4".

    Example:
    >>> import numpy as np
    >>> state = quantize_4bit(np.ones((64, 8), "float32"), "fp4")
    >>> state.quant_type, int(state.packed[0])  # two codes 3 (1.0)
    ('fp4', 51)
    """
    fmt = four_bit_format(quant_type)
    block_size = check_block_size(block_size)
    double_quant = check_flag(double_quant, "double_quant")
    scale_search = check_flag(scale_search, "scale_search")
    kernel = as_float_matrix(kernel_2d)
    k, n = kernel.shape
    flat = np.ascontiguousarray(kernel.T).reshape(-1)  # [N, K] row-major
    del kernel
    blocks = num_blocks(flat.size, block_size)
    padded = np.zeros(blocks * block_size, dtype=np.float32)
    padded[: flat.size] = flat
    del flat
    w = padded.reshape(blocks, block_size)
    absmax = np.abs(w).max(axis=1)
    if flat_tail(k * n, block_size) and absmax[-1] == 0:
        absmax[-1] = _TINY  # bitsandbytes' clamp on a partial last block
    scales = _search_scales(w, absmax, fmt) if scale_search else absmax
    if double_quant:
        q, scale2, offset = double_quantize_absmax(scales)
        stored = q
        effective = dequantize_absmax(q, scale2, offset)
    else:
        scale2 = offset = None
        stored = effective = scales
    # bitsandbytes rounds against the unquantized absmax; with scale search
    # we round against the scale dequantization will really use.
    indices = _nearest_indices(w, effective if scale_search else scales, fmt)
    tail = flat_tail(k * n, block_size)
    if tail and not scale_search:
        # bitsandbytes divides the partial last block by its absmax instead
        # of multiplying by the reciprocal; the last bit can differ.
        last = w[-1, :tail] / scales[-1]
        indices[-1, :tail] = fmt.nearest(last)
    packed = pack_nibbles(indices.reshape(-1)[: k * n], fmt.zero_index)
    return NF4State(
        packed=packed,
        absmax=stored,
        shape=(k, n),
        block_size=block_size,
        absmax_scale=scale2,
        absmax_offset=offset,
        quant_type=quant_type,
    )


def four_bit_format(quant_type: Any) -> codes.FourBitFormat:
    """The table of a 4-bit `quant_type` ("nf4" or "fp4").

    Raises:
        TypeError / ValueError: not a known base format, or "int8".
    """
    check_quant_type(quant_type)
    if quant_type not in codes.FOUR_BIT_FORMATS:
        raise ValueError(
            "quant_type must be a 4-bit format, one of "
            f"{tuple(codes.FOUR_BIT_FORMATS)}, here. Received: "
            f"quant_type={quant_type!r}"
        )
    return codes.FOUR_BIT_FORMATS[quant_type]


def dequantize_nf4(state: NF4State) -> np.ndarray:
    """Returns the float32 kernel `[K, N]` that a 4-bit `state` represents.

    Every element is `code[index] * block_scale` (the NF4 or FP4 table),
    one float32 multiply, exactly as bitsandbytes computes it.
    """
    if not isinstance(state, NF4State):
        raise TypeError(
            f"dequantize_nf4 expects an NF4State. Received: {type(state)}"
        )
    table = four_bit_format(state.quant_type).code
    k, n = state.shape
    blocks, bs = state.num_blocks, state.block_size
    values = np.zeros(blocks * bs, dtype=np.float32)
    values[: k * n] = table[unpack_nibbles(state.packed, k * n)]
    values = values.reshape(blocks, bs) * state.block_absmax()[:, None]
    return np.ascontiguousarray(values.reshape(-1)[: k * n].reshape(n, k).T)


def double_quantize_absmax(absmax: np.ndarray):
    """Quantizes block scales to 8 bits, as bitsandbytes' nested state.

    `offset = mean(absmax)`; `absmax - offset` is quantized blockwise (256)
    to the nearest entry of the signed dynamic map.

    Returns:
        `(codes uint8 [blocks], scale float32 [ceil(blocks / 256)], offset)`.
    """
    absmax = np.asarray(absmax, dtype=np.float32)
    offset = np.float32(np.mean(absmax, dtype=np.float64))
    centered = absmax - offset
    blocks = num_blocks(centered.size, NESTED_BLOCK_SIZE)
    padded = np.zeros(blocks * NESTED_BLOCK_SIZE, dtype=np.float32)
    padded[: centered.size] = centered
    padded = padded.reshape(blocks, NESTED_BLOCK_SIZE)
    scale = np.abs(padded).max(axis=1)
    inv = np.float32(1) / np.maximum(scale, _TINY)
    normed = np.clip(padded * inv[:, None], -1, 1)
    q = np.searchsorted(codes.dynamic_map_midpoints(), normed, side="left")
    return (
        q.reshape(-1)[: centered.size].astype(np.uint8),
        scale.astype(np.float32),
        float(offset),
    )


def flat_tail(num_elements: int, block_size: int) -> int:
    """Elements in the last, partial block (0 when blocks divide evenly)."""
    return num_elements % block_size


def as_float_matrix(kernel_2d: Any) -> np.ndarray:
    """The kernel a quantizer takes, as a finite float32 numpy `[K, N]`.

    Shared by `quantize_nf4` and the C++ quantizer
    (`keras_qlora.ops.quantize_nf4_fused`), so both refuse the same inputs
    with the same messages.

    Args:
        kernel_2d: float array-like (numpy, TF or Keras tensor/variable).

    Returns:
        A float32 numpy array of shape `[K, N]`.

    Raises:
        TypeError: a non-floating kernel.
        ValueError: not 2-D, empty, or non-finite values.
    """
    if hasattr(kernel_2d, "numpy"):
        kernel_2d = kernel_2d.numpy()
    arr = np.asarray(kernel_2d)
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise TypeError(
            "quantize_nf4 expects a floating-point kernel. "
            f"Received: dtype={arr.dtype}"
        )
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(
            "quantize_nf4 expects a non-empty 2-D kernel [K, N]. "
            f"Received: shape={arr.shape}"
        )
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.isfinite(arr).sum())
        raise ValueError(
            f"quantize_nf4: the kernel has {bad} non-finite values "
            "(NaN or Inf); refusing to quantize it."
        )
    return arr


def _nearest_indices(w: np.ndarray, scale: np.ndarray, fmt) -> np.ndarray:
    """4-bit code of every element of `w` [blocks, bs] under block `scale`
    (`fmt`: a `codes.FourBitFormat`)."""
    out = np.empty(w.shape, dtype=np.uint8)
    rows = max(1, _CHUNK_ELEMENTS // w.shape[1])
    for start in range(0, w.shape[0], rows):
        sl = slice(start, start + rows)
        s = scale[sl]
        inv = np.float32(1) / np.maximum(s, _TINY)
        # No clip to [-1, 1] needed: every midpoint lies inside it, so
        # values beyond it already land on index 0 or 15.
        idx = fmt.nearest(w[sl] * inv[:, None])
        # A non-positive scale (possible only after double quant of a block
        # that is almost zero) must not flip signs: store zeros there.
        idx[s <= 0] = fmt.zero_index
        out[sl] = idx
    return out


def _search_scales(w: np.ndarray, absmax: np.ndarray, fmt) -> np.ndarray:
    """Per-block scale from `SCALE_SEARCH_GRID * absmax` with least SSE."""
    best = absmax.copy()
    rows = max(1, _CHUNK_ELEMENTS // w.shape[1])
    for start in range(0, w.shape[0], rows):
        sl = slice(start, start + rows)
        wc, am = w[sl], absmax[sl]
        best_err = np.full(am.shape, np.inf, dtype=np.float64)
        for frac in SCALE_SEARCH_GRID:
            s = (am * frac).astype(np.float32)
            idx = _nearest_indices(wc, s, fmt)
            err = _block_sse(wc - fmt.code[idx] * s[:, None])
            # Strict `<`: on equal error the earlier candidate (larger
            # scale, 1.0 first) wins.
            better = err < best_err
            best_err[better] = err[better]
            best[sl][better] = s[better]
    return best


def _block_sse(diff: np.ndarray) -> np.ndarray:
    """Squared error of every block of `diff` [blocks, bs] (float32).

    The summation order is part of the format's definition, so that the C++
    quantizer (custom_ops/kernels/nf4_quantize_kernels.cc) picks the same
    scales bit for bit: `diff` is `w - code * s` rounded twice in float32
    (numpy never fuses it into an fma), each difference is squared in
    float64 (exact: 24-bit mantissas) and a block's squares are added one
    after the other, first element first, in float64. numpy's `sum` would
    use a pairwise order that depends on its version and SIMD width.
    """
    squares = np.square(diff.T, dtype=np.float64)  # (bs, blocks)
    err = squares[0].copy()
    for column in squares[1:]:
        err += column
    return err
