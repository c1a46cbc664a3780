"""The NF4 matmul op: wrapper, reference path, quantizer and library.

Re-exports only; one concept per module:

- `fused`: the op wrapper `nf4_matmul` (fused C++ op or pure-TF reference,
  with its gradient) and `reference_path()`;
- `tensors`: `NF4Tensors`, the 4-bit weight as the wrapper takes it;
- `reference`: the pure `keras.ops` reference (dequantize, then matmul);
- `quantize`: `quantize_nf4_fused`, the C++ quantizer;
- `loader`: lazy loading of the op library and the fallback warning;
- `build`: compiling the op library (compilers, cache key, atomic writes).
"""

from keras_qlora.ops.fused import OP_TYPE
from keras_qlora.ops.fused import active_path
from keras_qlora.ops.fused import fused_library
from keras_qlora.ops.fused import nf4_matmul
from keras_qlora.ops.fused import reference_path
from keras_qlora.ops.loader import status as library_status
from keras_qlora.ops.quantize import quantize_nf4_fused
from keras_qlora.ops.reference import dequantize_transposed
from keras_qlora.ops.tensors import NF4Tensors

__all__ = [
    "NF4Tensors",
    "OP_TYPE",
    "active_path",
    "dequantize_transposed",
    "fused_library",
    "library_status",
    "nf4_matmul",
    "quantize_nf4_fused",
    "reference_path",
]
