"""Keras layers holding a frozen NF4 weight and a trainable LoRA adapter."""

from keras_qlora.layers.base import QLoRALayerBase
from keras_qlora.layers.einsum_plan import EinsumPlan
from keras_qlora.layers.einsum_plan import plan_einsum
from keras_qlora.layers.qlora_dense import QLoRADense
from keras_qlora.layers.qlora_einsum_dense import QLoRAEinsumDense

__all__ = [
    "EinsumPlan",
    "QLoRADense",
    "QLoRAEinsumDense",
    "QLoRALayerBase",
    "plan_einsum",
]
