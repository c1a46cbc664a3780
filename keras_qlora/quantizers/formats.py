"""One entry point per direction for every base format: `quantize`,
`dequantize`."""

from typing import Any

import numpy as np

from keras_qlora.quantizers.int8 import dequantize_int8
from keras_qlora.quantizers.int8 import quantize_int8
from keras_qlora.quantizers.nf4 import dequantize_nf4
from keras_qlora.quantizers.nf4 import quantize_4bit
from keras_qlora.quantizers.state import NF4State
from keras_qlora.quantizers.state import check_block_size
from keras_qlora.quantizers.state import check_flag
from keras_qlora.quantizers.state import check_quant_type


def quantize(
    kernel_2d: Any,
    quant_type: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    scale_search: bool = True,
) -> NF4State:
    """Quantizes a Keras kernel `[K, N]` to the base format `quant_type`.

    Args:
        kernel_2d: float array-like of shape `[K, N]`.
        quant_type: "nf4" (NormalFloat-4, the default), "fp4"
            (bitsandbytes' 4-bit float) or "int8" (one scale per output,
            bitsandbytes' LLM.int8() weight).
        block_size, double_quant, scale_search: the 4-bit formats'
            settings (see `quantize_nf4`); checked, but not used by
            "int8", which has one scale per output and no double quant.

    Returns:
        An `NF4State` of that format.

    Raises:
        TypeError / ValueError: a bad argument, named.

    Example:
    >>> import numpy as np
    >>> w = np.random.randn(64, 8).astype("float32")
    >>> [quantize(w, t).bits_per_weight for t in ("fp4", "int8")]
    [4.25, 8.5]
    """
    quant_type = check_quant_type(quant_type)
    if quant_type != "int8":
        return quantize_4bit(
            kernel_2d, quant_type, block_size, double_quant, scale_search
        )
    check_block_size(block_size)
    check_flag(double_quant, "double_quant")
    check_flag(scale_search, "scale_search")
    return quantize_int8(kernel_2d)


def dequantize(state: NF4State) -> np.ndarray:
    """Returns the float32 kernel `[K, N]` that `state` represents, in any
    base format.

    Example:
    >>> import numpy as np
    >>> w = np.array([[1.0, -0.5], [0.25, 2.0]], "float32")
    >>> dequantize(quantize(w, "fp4", block_size=32)).tolist()
    [[1.0, -0.5], [0.3333333432674408, 2.0]]
    """
    if isinstance(state, NF4State) and state.quant_type == "int8":
        return dequantize_int8(state)
    return dequantize_nf4(state)
