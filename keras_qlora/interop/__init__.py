"""Conversion between keras_qlora states and other libraries' formats."""

from keras_qlora.interop.bitsandbytes import from_bitsandbytes
from keras_qlora.interop.bitsandbytes import to_bitsandbytes

__all__ = ["from_bitsandbytes", "to_bitsandbytes"]
