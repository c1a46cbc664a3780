"""Loading checkpoints straight into 4-bit: `from_preset`."""

from keras_qlora.loading.preset import from_preset

__all__ = ["from_preset"]
