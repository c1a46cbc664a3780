"""Weights in each base format (nf4 / fp4 / int8) for the CUDA checks.

numpy only (the GPU machine has no TensorFlow or Keras). `make_state` and
`dequantize` use keras_qlora.quantizers' `quantize` / `dequantize` when the
package has them; otherwise they follow the formats' rules
(custom_ops/include/nf4_format.h) here:

- fp4: NF4's layout, blocks and double quant with bitsandbytes' FP4 table;
  each value goes to the nearest entry of the sorted table (midpoints, ties
  to the lower one) and is stored as that entry's code; padding code 0.
- int8: W^T [N, K] as int8 bytes, row-major, one float32 scale per row
  (its absmax, bitsandbytes' SCB); block_size == K; value
  (code * SCB[n]) * float32(1 / 127), two float32 multiplies.

States are keras_qlora.quantizers.NF4State objects (nf4, and every format
once the package has `quantize`) or `FormatState` (same fields).
"""

import dataclasses

import numpy as np

QUANT_TYPES = ("nf4", "fp4", "int8")
# The C ABI's quant_type (KQ_NF4_QUANT_* in custom_ops/cuda/nf4_cuda.h).
QUANT_CODES = {"nf4": 0, "fp4": 1, "int8": 2}
_FP4_HEX = (
    "0x0p+0 0x1.555556p-8 0x1.555556p-1 0x1p+0 0x1.555556p-2 0x1p-1 "
    "0x1.555556p-3 0x1p-2 0x0p+0 -0x1.555556p-8 -0x1.555556p-1 -0x1p+0 "
    "-0x1.555556p-2 -0x1p-1 -0x1.555556p-3 -0x1p-2"
)
FP4_CODE = np.array([float.fromhex(v) for v in _FP4_HEX.split()], np.float32)
FP4_SORTED_CODES = np.array(
    [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], np.uint8
)
_FP4_SORTED = FP4_CODE[FP4_SORTED_CODES]
_FP4_MIDPOINTS = ((_FP4_SORTED[:-1] + _FP4_SORTED[1:]) / np.float32(2)).astype(
    np.float32
)
INT8_INV_MAX = np.float32(float.fromhex("0x1.020408p-7"))  # float32(1/127)


@dataclasses.dataclass
class FormatState:
    """The fields of NF4State plus `quant_type`, without its checks (which
    know only nf4 until the package's formats land)."""

    packed: np.ndarray
    absmax: np.ndarray
    shape: tuple
    block_size: int
    absmax_scale: np.ndarray | None = None
    absmax_offset: float | None = None
    quant_type: str = "nf4"


def quant_type_of(state) -> str:
    return getattr(state, "quant_type", "nf4")


def make_state(quantizers, kernel, quant_type="nf4", block_size=64, dq=True):
    """`kernel` [K, N] float32 in `quant_type` (int8 ignores block_size and
    dq: one scale per W^T row, no double quant); no scale search."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(
            f"quant_type must be one of {QUANT_TYPES}. Received: {quant_type}"
        )
    if hasattr(quantizers, "quantize"):
        if quant_type == "int8":
            block_size, dq = kernel.shape[0], False
        return quantizers.quantize(
            kernel,
            quant_type=quant_type,
            block_size=block_size,
            double_quant=dq,
            scale_search=False,
        )
    if quant_type == "int8":
        return _quantize_int8(kernel)
    state = quantizers.quantize_nf4(
        kernel, block_size=block_size, double_quant=dq, scale_search=False
    )
    return state if quant_type == "nf4" else _as_fp4(quantizers, state, kernel)


def dequantize(quantizers, state) -> np.ndarray:
    """The float32 W [K, N] a state holds, each element exactly as the
    kernels decode it."""
    if hasattr(quantizers, "dequantize"):
        return quantizers.dequantize(state)
    quant_type = quant_type_of(state)
    if quant_type == "nf4":
        return quantizers.dequantize_nf4(state)
    k, n = state.shape
    if quant_type == "int8":
        codes = state.packed.view(np.int8).reshape(n, k).astype(np.float32)
        wt = (codes * state.absmax[:, None]).astype(np.float32) * INT8_INV_MAX
        return np.ascontiguousarray(wt.T)
    scales = _block_scales(quantizers, state)
    bs = state.block_size
    values = np.zeros(len(scales) * bs, np.float32)
    values[: k * n] = FP4_CODE[quantizers.unpack_nibbles(state.packed, k * n)]
    values = values.reshape(-1, bs) * scales[:, None]
    return np.ascontiguousarray(values.reshape(-1)[: k * n].reshape(n, k).T)


def _block_scales(quantizers, state) -> np.ndarray:
    if state.absmax_scale is None:
        return state.absmax
    return quantizers.dequantize_absmax(
        state.absmax, state.absmax_scale, state.absmax_offset
    )


def _as_fp4(quantizers, nf4_state, kernel) -> FormatState:
    """fp4 codes against the block scales of an NF4 state (same layout)."""
    k, n = nf4_state.shape
    bs = nf4_state.block_size
    scales = _block_scales(quantizers, nf4_state)
    flat = np.zeros(len(scales) * bs, np.float32)
    flat[: k * n] = np.ascontiguousarray(kernel.T, np.float32).reshape(-1)
    w = flat.reshape(-1, bs)
    safe = np.where(scales > 0, scales, np.float32(1))[:, None]
    normed = np.where(scales[:, None] > 0, w / safe, np.float32(0))
    position = np.searchsorted(_FP4_MIDPOINTS, normed, side="left")
    codes = FP4_SORTED_CODES[position].reshape(-1)[: k * n]
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])  # code of 0
    packed = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)
    return FormatState(
        packed=packed,
        absmax=nf4_state.absmax,
        shape=(k, n),
        block_size=bs,
        absmax_scale=nf4_state.absmax_scale,
        absmax_offset=nf4_state.absmax_offset,
        quant_type="fp4",
    )


def _quantize_int8(kernel) -> FormatState:
    """bitsandbytes' row-wise int8 (Int8Params: CB, SCB) of W^T."""
    k, n = kernel.shape
    wt = np.ascontiguousarray(kernel.T, np.float32)  # [N, K]
    scb = np.abs(wt).max(axis=1).astype(np.float32)
    safe = np.where(scb > 0, scb, np.float32(1))[:, None]
    codes = np.clip(np.rint(wt * (np.float32(127) / safe)), -127, 127)
    return FormatState(
        packed=codes.astype(np.int8).view(np.uint8).reshape(-1),
        absmax=scb,
        shape=(k, n),
        block_size=k,
        quant_type="int8",
    )
