"""Adapters: files (`save_adapter` / `load_adapter`) and named adapters.

Example:
>>> model = keras_qlora.apply(backbone, rank=8)
>>> model.fit(...)
>>> keras_qlora.save_adapter(model, "adapters/task_a")
>>> keras_qlora.load_adapter(model, "adapters/task_b", name="task_b")
>>> keras_qlora.set_adapter(model, "task_b")
"""

from keras_qlora.adapters.files import NonFiniteError
from keras_qlora.adapters.files import load_adapter
from keras_qlora.adapters.files import save_adapter
from keras_qlora.adapters.merge import merge
from keras_qlora.adapters.merge import unmerge
from keras_qlora.adapters.named import active_adapter
from keras_qlora.adapters.named import adapters_enabled
from keras_qlora.adapters.named import add_adapter
from keras_qlora.adapters.named import delete_adapter
from keras_qlora.adapters.named import disable_adapters
from keras_qlora.adapters.named import enable_adapters
from keras_qlora.adapters.named import list_adapters
from keras_qlora.adapters.named import set_adapter

__all__ = [
    "NonFiniteError",
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
    "unmerge",
]
