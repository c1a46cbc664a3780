"""Weights in each base format (nf4 / fp4 / int8) for the CUDA checks.

numpy only (the GPU machine has no TensorFlow or Keras): the package's
`keras_qlora.quantizers.quantize` / `dequantize` (loaded by
`nf4_abi.load_quantizers()` without Keras), plus the C ABI's code of each
format. The formats themselves are defined in
custom_ops/include/nf4_format.h and keras_qlora/quantizers/, once each.
"""

QUANT_TYPES = ("nf4", "fp4", "int8")
# The C ABI's quant_type (KQ_NF4_QUANT_* in custom_ops/cuda/nf4_cuda.h).
QUANT_CODES = {"nf4": 0, "fp4": 1, "int8": 2}


def quant_type_of(state) -> str:
    return getattr(state, "quant_type", "nf4")


def make_state(quantizers, kernel, quant_type="nf4", block_size=64, dq=True):
    """`kernel` [K, N] float32 as an NF4State of `quant_type`, without scale
    search. int8 ignores block_size and dq (one scale per W^T row, no double
    quant; its state's block_size is K)."""
    if quant_type == "int8":
        block_size, dq = 64, False
    return quantizers.quantize(
        kernel,
        quant_type=quant_type,
        block_size=block_size,
        double_quant=dq,
        scale_search=False,
    )


def dequantize(quantizers, state):
    """The float32 W [K, N] a state holds, each element exactly as the
    kernels decode it."""
    return quantizers.dequantize(state)
