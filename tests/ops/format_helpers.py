"""numpy oracles of the fp4 and int8 base formats, written from the contract.

Independent of the C++ kernels (custom_ops/include/nf4_format.h) and of
keras_qlora.quantizers' fp4 / int8 code, so the tests compare two separate
implementations of the same rules:

- fp4: nf4's layout (W^T [N, K] row-major, blocks, two codes per byte, the
  first element in the high nibble, optional double quant), with
  bitsandbytes' FP4 table. Quantizing rounds to the nearest value of the
  SORTED table (float32 midpoints (a + b) / 2, a tie goes to the lower one:
  searchsorted side="left") and stores FP4_SORTED_CODES[position]; zero
  blocks and the padding nibble get code 0.
- int8: one signed byte per element of W^T, one float32 scale (SCB) per row;
  value = (float32(code) * SCB[row]) * float32(1/127), two float32
  multiplies.
"""

import numpy as np

from keras_qlora.quantizers import dequantize_absmax
from keras_qlora.quantizers import double_quantize_absmax

# bitsandbytes' FP4 values: index i is the 4-bit code i.
FP4_CODE = np.array(
    [
        float.fromhex(h)
        for h in (
            "0x0p+0", "0x1.555556p-8", "0x1.555556p-1", "0x1p+0",
            "0x1.555556p-2", "0x1p-1", "0x1.555556p-3", "0x1p-2",
            "0x0p+0", "-0x1.555556p-8", "-0x1.555556p-1", "-0x1p+0",
            "-0x1.555556p-2", "-0x1p-1", "-0x1.555556p-3", "-0x1p-2",
        )
    ],
    np.float32,
)  # fmt: skip
FP4_SORTED_CODES = np.array(
    [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], np.uint8
)
FP4_SORTED = FP4_CODE[FP4_SORTED_CODES]
FP4_MIDPOINTS = ((FP4_SORTED[:-1] + FP4_SORTED[1:]) / np.float32(2)).astype(
    np.float32
)
FP4_ZERO_CODE = 0
ZERO_POSITION = 7  # sorted position of the (first) 0.0
INT8_INV_MAX = np.float32(float.fromhex("0x1.020408p-7"))
SCALE_SEARCH_GRID = np.linspace(1.0, 0.80, 11, dtype=np.float32)
TINY = np.float32(1e-38)

assert np.all(np.diff(FP4_SORTED) >= 0)


def fp4_codes_of(values):
    """The fp4 code of each float32 value (already divided by its scale)."""
    positions = np.searchsorted(FP4_MIDPOINTS, values, side="left")
    return FP4_SORTED_CODES[positions]


def _positions(w, scale):
    """Sorted positions of w [blocks, bs] under block `scale` (float32)."""
    inv = np.float32(1) / np.maximum(scale, TINY)
    pos = np.searchsorted(FP4_MIDPOINTS, w * inv[:, None], side="left")
    pos[scale <= 0] = ZERO_POSITION
    return pos


def _block_sse(diff):
    """Sum of float64 squares of each row, first element first."""
    squares = np.square(diff.astype(np.float64))
    err = np.zeros(diff.shape[0], np.float64)
    for j in range(diff.shape[1]):
        err += squares[:, j]
    return err


def _search_scales(w, absmax):
    best = absmax.copy()
    best_err = np.full(absmax.shape, np.inf, np.float64)
    for frac in SCALE_SEARCH_GRID:
        s = (absmax * frac).astype(np.float32)
        q = (FP4_SORTED[_positions(w, s)] * s[:, None]).astype(np.float32)
        err = _block_sse((w - q).astype(np.float32))
        better = err < best_err
        best_err[better] = err[better]
        best[better] = s[better]
    return best


def pack_codes(codes, pad_code):
    codes = np.asarray(codes, np.uint8).reshape(-1)
    if codes.size % 2:
        codes = np.concatenate([codes, np.array([pad_code], np.uint8)])
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def unpack_codes(packed, count):
    out = np.empty(2 * packed.size, np.uint8)
    out[0::2] = packed >> 4
    out[1::2] = packed & 0x0F
    return out[:count]


def block_scales_fp4(weight_t, block_size, scale_search):
    """What NF4BlockScales(quant_type="fp4") returns for W^T [N, K]."""
    flat = np.asarray(weight_t, np.float32).reshape(-1)
    blocks = -(-flat.size // block_size)
    w = np.zeros(blocks * block_size, np.float32)
    w[: flat.size] = flat
    w = w.reshape(blocks, block_size)
    absmax = np.abs(w).max(axis=1)
    if flat.size % block_size and absmax[-1] == 0:
        absmax[-1] = TINY
    return _search_scales(w, absmax) if scale_search else absmax


def encode_fp4(weight_t, scales, block_size, divide_tail=False):
    """What NF4Encode(quant_type="fp4") returns for W^T [N, K]."""
    flat = np.asarray(weight_t, np.float32).reshape(-1)
    blocks = -(-flat.size // block_size)
    w = np.zeros(blocks * block_size, np.float32)
    w[: flat.size] = flat
    w = w.reshape(blocks, block_size)
    scales = np.asarray(scales, np.float32)
    pos = _positions(w, scales)
    tail = flat.size % block_size
    if tail and divide_tail and scales[-1] > 0:
        pos[-1, :tail] = np.searchsorted(
            FP4_MIDPOINTS, w[-1, :tail] / scales[-1], side="left"
        )
    codes = FP4_SORTED_CODES[pos].reshape(-1)[: flat.size]
    return pack_codes(codes, FP4_ZERO_CODE)


def quantize_fp4(kernel, block_size, double_quant, scale_search):
    """fp4 state of a Keras kernel [K, N], as quantize_nf4 does for nf4.

    Returns:
        dict: packed, absmax (stored: uint8 with double quant), absmax_scale,
        absmax_offset (None without double quant) and `scales`, the float32
        scale of every block that dequantization uses.
    """
    weight_t = np.ascontiguousarray(np.asarray(kernel, np.float32).T)
    scales = block_scales_fp4(weight_t, block_size, scale_search)
    if double_quant:
        stored, scale2, offset = double_quantize_absmax(scales)
        effective = dequantize_absmax(stored, scale2, offset)
    else:
        scale2 = offset = None
        stored = effective = scales
    packed = encode_fp4(
        weight_t,
        effective if scale_search else scales,
        block_size,
        divide_tail=not scale_search,
    )
    return dict(
        packed=packed,
        absmax=stored,
        absmax_scale=scale2,
        absmax_offset=offset,
        scales=effective,
    )


def dequantize_fp4(packed, scales, k, n, block_size):
    """float32 kernel [K, N] of an fp4 state (scales: float32 per block)."""
    count = k * n
    blocks = -(-count // block_size)
    values = np.zeros(blocks * block_size, np.float32)
    values[:count] = FP4_CODE[unpack_codes(packed, count)]
    values = (values.reshape(blocks, block_size) * scales[:, None]).reshape(-1)
    return np.ascontiguousarray(values[:count].reshape(n, k).T)


def int8_state(k, n, seed):
    """Random int8 state of a kernel [K, N]: (packed uint8 [K * N], SCB
    float32 [N]). Codes span all of [-128, 127]."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-128, 128, size=(n, k)).astype(np.int8)
    scb = (rng.random(n) * 3 + 0.01).astype(np.float32)
    return codes.reshape(-1).view(np.uint8).copy(), scb


def dequantize_int8(packed, scb, k, n):
    """float32 kernel [K, N] of an int8 state, as the contract says."""
    codes = packed.view(np.int8).reshape(n, k).astype(np.float32)
    values = (codes * scb[:, None]).astype(np.float32) * INT8_INV_MAX
    return np.ascontiguousarray(values.astype(np.float32).T)
