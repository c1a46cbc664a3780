"""int8 quantization of 2-D kernels: one absmax scale per output.

The format of bitsandbytes' LLM.int8() weights (`Int8Params`,
`Linear8bitLt`): for the transposed kernel `W^T` (`[N, K]`, torch's
`Linear.weight`), `SCB[n] = max |W^T[n, :]|` and
`CB[n, k] = round(W^T[n, k] * ((1 / SCB[n]) * 127))` in float32 with ties
to even, as its `int8_vectorwise_quant` computes them; an element dequantizes
to `(CB * SCB) / 127` as its `int8_vectorwise_dequant` does (two float32
multiplies by `codes.INT8_INV_MAX`).
"""

from typing import Any

import numpy as np

from keras_qlora.quantizers import codes
from keras_qlora.quantizers.nf4 import as_float_matrix
from keras_qlora.quantizers.state import NF4State

# Rows converted at once, to bound temporary memory (~64 MB of float32).
_CHUNK_ELEMENTS = 1 << 24


def quantize_int8(kernel_2d: Any) -> NF4State:
    """Quantizes a Keras kernel `[K, N]` to int8 with a scale per output.

    The bytes equal bitsandbytes' `int8_vectorwise_quant(W.T)` of the
    float32 kernel (`CB` as `packed`, `SCB` as `absmax`). A row of zeros
    gets the scale 0 and zero codes (bitsandbytes divides by zero there).
    bitsandbytes' `Int8Params` rounds a float32 weight to float16 before
    quantizing; for weights that are float16 values already (the usual
    case) the bytes are the same.

    Args:
        kernel_2d: float array-like of shape `[K, N]`.

    Returns:
        An `NF4State` with `quant_type="int8"`, `block_size=K`: `packed`
        holds the `K * N` codes of `W^T` row-major as uint8 bit patterns,
        `absmax` the float32 `[N]` scales.

    Raises:
        TypeError: a non-floating kernel.
        ValueError: not 2-D, empty, or non-finite values.

    Example:
    >>> import numpy as np
    >>> state = quantize_int8(np.array([[1.0, 0.0], [-0.5, 0.0]], "float32"))
    >>> state.absmax.tolist(), state.packed.view("int8").tolist()
    ([1.0, 0.0], [127, -64, 0, 0])
    """
    kernel = as_float_matrix(kernel_2d)
    k, n = kernel.shape
    scales = np.abs(kernel).max(axis=0).astype(np.float32)  # [N]
    out = np.empty((n, k), dtype=np.int8)
    rows = max(1, _CHUNK_ELEMENTS // k)
    with np.errstate(divide="ignore"):
        # torch computes `127.0 / row_stats` as reciprocal, then multiply:
        # two float32 roundings, which decide codes at exact .5 ties.
        inv = (np.float32(1) / scales) * np.float32(127)
    inv[scales == 0] = 0
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        scaled = kernel[:, sl].T * inv[sl, None]  # float32, one rounding
        out[sl] = np.clip(np.rint(scaled), -127, 127).astype(np.int8)
    return NF4State(
        packed=out.reshape(-1).view(np.uint8),
        absmax=scales,
        shape=(k, n),
        block_size=k,
        quant_type="int8",
    )


def dequantize_int8(state: NF4State) -> np.ndarray:
    """The float32 kernel `[K, N]` of an int8 `state`.

    Every element is `(code * scale) * INT8_INV_MAX`, two float32
    multiplies, exactly as bitsandbytes' `int8_vectorwise_dequant`.

    Example:
    >>> import numpy as np
    >>> w = np.array([[2.0], [-1.0]], "float32")
    >>> dequantize_int8(quantize_int8(w)).ravel().tolist()
    [2.0, -1.0078740119934082]
    """
    if not isinstance(state, NF4State) or state.quant_type != "int8":
        raise TypeError(
            "dequantize_int8 expects an NF4State with quant_type='int8'. "
            f"Received: {_describe(state)}"
        )
    k, n = state.shape
    values = state.packed.view(np.int8).reshape(n, k).astype(np.float32)
    values *= state.absmax[:, None]
    values *= codes.INT8_INV_MAX
    return np.ascontiguousarray(values.T)


def _describe(state) -> str:
    if isinstance(state, NF4State):
        return f"NF4State(quant_type={state.quant_type!r})"
    return type(state).__name__
