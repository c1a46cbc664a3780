"""keras_qlora: QLoRA fine-tuning for Keras 3 on TensorFlow.

`model = keras_qlora.apply(model)` stores every linear layer as 4-bit
NormalFloat (NF4, bitsandbytes-compatible) and adds trainable LoRA adapters
to the target layers; train with `model.fit`.
"""

import os

# TensorFlow's oneDNN CPU allocator keeps freed memory in a pool of its own:
# the float kernels that apply() frees, and each training step's
# temporaries, would stay in RSS. Taking TF's memory from malloc lets
# `apply()` / `from_preset` hand it back (docs/performance.md). TF reads
# this when it first allocates, so it must be set before any TF op runs;
# set it to "0" beforehand to keep TF's pool.
os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")

from keras_qlora import interop  # noqa: E402
from keras_qlora import quantizers
from keras_qlora import report
from keras_qlora import training
from keras_qlora.adapters import active_adapter
from keras_qlora.adapters import adapters_enabled
from keras_qlora.adapters import add_adapter
from keras_qlora.adapters import delete_adapter
from keras_qlora.adapters import disable_adapters
from keras_qlora.adapters import enable_adapters
from keras_qlora.adapters import list_adapters
from keras_qlora.adapters import load_adapter
from keras_qlora.adapters import merge
from keras_qlora.adapters import save_adapter
from keras_qlora.adapters import set_adapter
from keras_qlora.adapters import unmerge
from keras_qlora.export import export
from keras_qlora.export import load_saved_model
from keras_qlora.layers import QLoRADense
from keras_qlora.layers import QLoRAEinsumDense
from keras_qlora.loading import from_preset
from keras_qlora.model import QLoRAModel
from keras_qlora.quantizers import NF4State
from keras_qlora.quantizers import dequantize_nf4
from keras_qlora.quantizers import quantize_nf4
from keras_qlora.report import summary
from keras_qlora.rewrite import apply
from keras_qlora.settings import QLoRASettings

__version__ = "0.1.0"

__all__ = [
    "active_adapter",
    "adapters_enabled",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "list_adapters",
    "load_adapter",
    "merge",
    "save_adapter",
    "set_adapter",
    "training",
    "unmerge",
    "NF4State",
    "QLoRADense",
    "QLoRAEinsumDense",
    "QLoRAModel",
    "QLoRASettings",
    "apply",
    "dequantize_nf4",
    "export",
    "from_preset",
    "interop",
    "load_saved_model",
    "quantize_nf4",
    "quantizers",
    "report",
    "summary",
]
