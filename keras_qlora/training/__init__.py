"""Training QLoRA models: LoRA-only step, host-resident and 8-bit optimizer
state, gradient checkpointing, adapter checkpoints."""

from keras_qlora.training.adam8bit import AdamW8bit
from keras_qlora.training.adam8bit import dequantize_blockwise_8bit
from keras_qlora.training.adam8bit import quantize_blockwise_8bit
from keras_qlora.training.offload import HostOffloadOptimizer

__all__ = [
    "AdamW8bit",
    "HostOffloadOptimizer",
    "dequantize_blockwise_8bit",
    "quantize_blockwise_8bit",
]
