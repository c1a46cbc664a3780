"""Quantizers of the base formats (NF4, FP4, int8): code tables, quantize /
dequantize, packing, NF4State."""

from keras_qlora.quantizers.codes import FP4_CODE
from keras_qlora.quantizers.codes import NF4_CODE
from keras_qlora.quantizers.codes import dynamic_map
from keras_qlora.quantizers.formats import dequantize
from keras_qlora.quantizers.formats import quantize
from keras_qlora.quantizers.int8 import dequantize_int8
from keras_qlora.quantizers.int8 import quantize_int8
from keras_qlora.quantizers.nf4 import as_float_matrix
from keras_qlora.quantizers.nf4 import dequantize_nf4
from keras_qlora.quantizers.nf4 import double_quantize_absmax
from keras_qlora.quantizers.nf4 import pack_nibbles
from keras_qlora.quantizers.nf4 import quantize_4bit
from keras_qlora.quantizers.nf4 import quantize_nf4
from keras_qlora.quantizers.nf4 import unpack_nibbles
from keras_qlora.quantizers.state import ALLOWED_BLOCK_SIZES
from keras_qlora.quantizers.state import QUANT_TYPES
from keras_qlora.quantizers.state import NF4State
from keras_qlora.quantizers.state import check_block_size
from keras_qlora.quantizers.state import check_flag
from keras_qlora.quantizers.state import check_quant_type
from keras_qlora.quantizers.state import dequantize_absmax

__all__ = [
    "ALLOWED_BLOCK_SIZES",
    "FP4_CODE",
    "NF4State",
    "NF4_CODE",
    "QUANT_TYPES",
    "as_float_matrix",
    "check_block_size",
    "check_flag",
    "check_quant_type",
    "dequantize",
    "dequantize_absmax",
    "dequantize_int8",
    "dequantize_nf4",
    "double_quantize_absmax",
    "dynamic_map",
    "pack_nibbles",
    "quantize",
    "quantize_4bit",
    "quantize_int8",
    "quantize_nf4",
    "unpack_nibbles",
]
