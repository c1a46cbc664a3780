"""Checks of the float layer and kernel a QLoRA layer is made from.

Shared by `QLoRALayerBase.from_layer` / `check_source` and by
`keras_qlora.from_preset`, which quantizes kernels as it reads them.
"""

import keras
import numpy as np
from keras import ops


def check_source_kernel(layer, kernel):
    """Validates the float kernel a QLoRA layer is made from; returns numpy
    float32."""
    _check_float(layer, kernel)
    value = np.asarray(ops.convert_to_numpy(ops.cast(kernel, "float32")))
    _check_finite(layer, int(value.size - np.isfinite(value).sum()))
    return value


def check_source_values(layer, kernel):
    """`check_source_kernel` without the float32 copy (counted in the
    kernel's own dtype)."""
    _check_float(layer, kernel)
    finite = ops.sum(ops.cast(ops.isfinite(kernel), "int64"))
    _check_finite(layer, int(np.prod(kernel.shape)) - int(finite))


def _check_float(layer, kernel):
    dtype = keras.backend.standardize_dtype(kernel.dtype)
    if "float" not in dtype:
        raise TypeError(
            f"Layer '{layer.name}' has a {dtype} kernel; only float kernels "
            "can be quantized to NF4 (is it already quantized?)."
        )


def _check_finite(layer, bad):
    if bad:
        raise ValueError(
            f"Layer '{layer.name}': its kernel has {bad} non-finite values "
            "(NaN or Inf). Fix the weights before quantizing."
        )


def check_rank_fits(name, rank, k, n):
    if rank is not None and rank > min(k, n):
        raise ValueError(
            f"Layer '{name}': rank must be <= min(K, N) = {min(k, n)} for a "
            f"[{k}, {n}] kernel. Received: rank={rank}"
        )


def check_source_layer(layer):
    """Refuses layers Keras has already quantized or given a LoRA."""
    if getattr(layer, "quantization_mode", None):
        raise ValueError(
            f"Layer '{layer.name}' is already quantized by Keras "
            f"(mode={layer.quantization_mode!r}); keras_qlora needs the float "
            "layer."
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer '{layer.name}' has Keras' own LoRA enabled; merge or drop "
            "it before keras_qlora.apply()."
        )
    if not layer.built:
        raise ValueError(
            f"Layer '{layer.name}' is not built; build the model (call it on "
            "data) before converting it."
        )
