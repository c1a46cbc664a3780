"""Helpers shared by the NF4 op and quantizer cases (cases_ops_*.py): the
sizes of the small test weight, its NF4 state and `NF4Tensors`, the inputs
and the product they must give, and float kernels with a bad value.
"""

import numpy as np

K, N, BLOCK = 64, 32, 64  # 2048 elements, 32 blocks, 1024 packed bytes


def _state(double_quant=True, k=K, n=N, block_size=BLOCK):
    from keras_qlora.quantizers import quantize_nf4

    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((k, n)).astype("float32")
    return quantize_nf4(kernel, block_size, double_quant)


def _weight(double_quant=True, **fields):
    """An `NF4Tensors` of `_state()`, with `fields` replaced."""
    from keras_qlora.ops import NF4Tensors

    weight = NF4Tensors.from_state(_state(double_quant))
    values = dict(
        packed=weight.packed,
        absmax=weight.absmax,
        absmax_scale=weight.absmax_scale,
        absmax_offset=weight.absmax_offset,
        shape=weight.shape,
        block_size=weight.block_size,
    )
    values.update(fields)
    return NF4Tensors(**values)


def _x(m=2, width=K, dtype="float32"):
    rng = np.random.default_rng(1)
    return rng.standard_normal((m, width)).astype(dtype)


def _expected(x, state, transpose=False):
    from keras_qlora.quantizers import dequantize_nf4

    w = dequantize_nf4(state).astype(np.float64)
    return np.asarray(x, np.float64) @ (w.T if transpose else w)


def _kernel(shape=(K, N)):
    return np.random.default_rng(2).standard_normal(shape).astype("float32")


def _with(value, at=(3, 4)):
    kernel = _kernel()
    kernel[at] = value
    return kernel
