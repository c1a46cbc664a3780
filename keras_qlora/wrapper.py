"""Recognizing the model `apply()` returns, without importing it.

`QLoRAModel` (keras_qlora/model.py) sits high in the package: it imports
the layers, training and rewriting code. Modules below it (adapters,
training, interop, reports) still need to check "is this the model apply()
returned?" and to reach its base model. They do it through `QLoRAWrapper`,
a marker base class defined here, low in the package, that `QLoRAModel`
derives from, so imports keep pointing down.
"""

import keras


class QLoRAWrapper:
    """Marks a model as the wrapper `keras_qlora.apply()` returns.

    Subclasses keep the edited model in `base_model`.
    """

    base_model: keras.Model


def is_qlora_model(model) -> bool:
    """Whether `model` is the model `keras_qlora.apply()` returned."""
    return isinstance(model, QLoRAWrapper)


def require_qlora_model(model, caller: str):
    """Returns `model` when it is a `QLoRAModel`; raises otherwise.

    Args:
        model: what the user passed.
        caller: the public function's name as the user called it, e.g.
            "save_adapter" or "interop.to_bitsandbytes_model".

    Raises:
        TypeError: naming `caller` and the type received.
    """
    if not is_qlora_model(model):
        raise TypeError(
            f"keras_qlora.{caller}() expects the model returned by "
            f"keras_qlora.apply(). Received: {type(model).__name__}"
        )
    return model


def unwrap(model):
    """The edited base model of a `QLoRAModel`; any other model as is."""
    return model.base_model if is_qlora_model(model) else model
