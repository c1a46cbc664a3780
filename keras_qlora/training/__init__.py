"""Training QLoRA models: LoRA-only step, host-resident and 8-bit optimizer
state, gradient checkpointing, adapter checkpoints."""

from keras_qlora.remat import RECOGNIZED_BLOCKS
from keras_qlora.remat import checkpointed_layers
from keras_qlora.remat import disable_gradient_checkpointing
from keras_qlora.remat import enable_gradient_checkpointing
from keras_qlora.training.adam8bit import AdamW8bit
from keras_qlora.training.blockwise8bit import dequantize_blockwise_8bit
from keras_qlora.training.blockwise8bit import quantize_blockwise_8bit
from keras_qlora.training.checkpoint import AdapterCheckpoint
from keras_qlora.training.checkpoint import latest_checkpoint
from keras_qlora.training.checkpoint import restore_checkpoint
from keras_qlora.training.checkpoint import save_checkpoint
from keras_qlora.training.offload import HostOffloadOptimizer
from keras_qlora.training.options import TrainingOptions

__all__ = [
    "AdamW8bit",
    "AdapterCheckpoint",
    "latest_checkpoint",
    "restore_checkpoint",
    "save_checkpoint",
    "HostOffloadOptimizer",
    "TrainingOptions",
    "RECOGNIZED_BLOCKS",
    "checkpointed_layers",
    "disable_gradient_checkpointing",
    "enable_gradient_checkpointing",
    "dequantize_blockwise_8bit",
    "quantize_blockwise_8bit",
]
