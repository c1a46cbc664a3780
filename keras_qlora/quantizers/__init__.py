"""NF4 quantizers: code tables, quantize / dequantize, packing, NF4State."""

from keras_qlora.quantizers.codes import NF4_CODE
from keras_qlora.quantizers.codes import dynamic_map
from keras_qlora.quantizers.nf4 import as_float_matrix
from keras_qlora.quantizers.nf4 import dequantize_nf4
from keras_qlora.quantizers.nf4 import double_quantize_absmax
from keras_qlora.quantizers.nf4 import pack_nibbles
from keras_qlora.quantizers.nf4 import quantize_nf4
from keras_qlora.quantizers.nf4 import unpack_nibbles
from keras_qlora.quantizers.state import ALLOWED_BLOCK_SIZES
from keras_qlora.quantizers.state import NF4State
from keras_qlora.quantizers.state import check_block_size
from keras_qlora.quantizers.state import check_flag
from keras_qlora.quantizers.state import dequantize_absmax

__all__ = [
    "ALLOWED_BLOCK_SIZES",
    "NF4State",
    "NF4_CODE",
    "as_float_matrix",
    "check_block_size",
    "check_flag",
    "dequantize_absmax",
    "dequantize_nf4",
    "double_quantize_absmax",
    "dynamic_map",
    "pack_nibbles",
    "quantize_nf4",
    "unpack_nibbles",
]
