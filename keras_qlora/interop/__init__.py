"""Conversion between keras_qlora and other libraries' formats.

- bitsandbytes: one weight (`to_bitsandbytes` / `from_bitsandbytes`) or
  every QLoRA layer of a model (`to_bitsandbytes_model` /
  `from_bitsandbytes_model`), as `Linear4bit` state_dict entries.
- PEFT: LoRA adapter directories (`load_peft_adapter` /
  `save_peft_adapter`) for keras_hub BERT and GPT-2 backbones, and
  `apply_peft_adapter`, which applies keras_qlora to a float model as the
  adapter lays LoRA out and loads it.

Hugging Face module names come from one table, `keras_qlora.interop.names`.
"""

from keras_qlora.interop.bitsandbytes import from_bitsandbytes
from keras_qlora.interop.bitsandbytes import to_bitsandbytes
from keras_qlora.interop.bnb_model import from_bitsandbytes_model
from keras_qlora.interop.bnb_model import to_bitsandbytes_model
from keras_qlora.interop.names import NAMINGS
from keras_qlora.interop.peft import load_peft_adapter
from keras_qlora.interop.peft import save_peft_adapter
from keras_qlora.interop.peft_apply import apply_peft_adapter

__all__ = [
    "NAMINGS",
    "apply_peft_adapter",
    "from_bitsandbytes",
    "from_bitsandbytes_model",
    "load_peft_adapter",
    "save_peft_adapter",
    "to_bitsandbytes",
    "to_bitsandbytes_model",
]
