"""Training QLoRA models: LoRA-only step, host-resident and 8-bit optimizer
state, gradient checkpointing, adapter checkpoints."""

from keras_qlora.training.offload import HostOffloadOptimizer

__all__ = ["HostOffloadOptimizer"]
