"""Training options of a QLoRA model: what trains, and the optimizer setup.

`apply(..., bias=, offload_optimizer=, optimizer_8bit=,
gradient_checkpointing=)` records these options on the `QLoRAModel`; they
are checked here, and applied when the model is compiled (optimizer) or
built (biases).
"""

import re

import keras

from keras_qlora.training.offload import HostOffloadOptimizer
from keras_qlora.training.offload import check_offloadable

BIAS_MODES = ("none", "all", "lora_only")

DEFAULTS = {
    "bias": "none",
    "offload_optimizer": False,
    "optimizer_8bit": False,
    "gradient_checkpointing": False,
}


def check_options(options, has_lora):
    """Validates the training options; returns them as a plain dict.

    Args:
        options: dict with the keys of `DEFAULTS` (missing ones default).
        has_lora: whether the model carries any LoRA adapter.

    Raises:
        TypeError / ValueError: a bad value, or an optimizer option on a
            model that has no LoRA layers.
    """
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"Unknown training options {unknown}. Known: {sorted(DEFAULTS)}"
        )
    merged = dict(DEFAULTS, **options)
    if merged["bias"] not in BIAS_MODES:
        raise ValueError(
            f"bias must be one of {BIAS_MODES}. Received: "
            f"bias={merged['bias']!r}"
        )
    for key in ("offload_optimizer", "optimizer_8bit"):
        if not isinstance(merged[key], bool):
            raise TypeError(
                f"{key} must be True or False. Received: {key}={merged[key]!r}"
            )
        if merged[key] and not has_lora:
            raise ValueError(
                f"{key}=True needs LoRA adapters to train, but the model has "
                "no LoRA layers (target_modules=None). Pass target_modules, "
                f"or drop {key}."
            )
    gc = merged["gradient_checkpointing"]
    if gc is not True and gc is not False and not _is_selector(gc):
        raise TypeError(
            "gradient_checkpointing must be True, False, or a selector of "
            "the blocks to rematerialize (list of names, regex, callable). "
            f"Received: gradient_checkpointing={gc!r}"
        )
    return merged


def prepare_optimizer(optimizer, options):
    """The optimizer to compile with, after the 8-bit / offload options.

    Args:
        optimizer: what the user passed to `compile` (instance or name).
        options: checked training options.

    Returns:
        A Keras optimizer: converted to `AdamW8bit` when `optimizer_8bit`,
        wrapped in `HostOffloadOptimizer` when `offload_optimizer`.

    Raises:
        TypeError: the optimizer cannot be made 8-bit or offloaded.
    """
    optimizer = keras.optimizers.get(optimizer)
    if options["optimizer_8bit"] and type(optimizer).__name__ != "AdamW8bit":
        from keras_qlora.training.adam8bit import AdamW8bit

        optimizer = AdamW8bit.from_optimizer(optimizer)
    if options["offload_optimizer"] and not isinstance(
        optimizer, HostOffloadOptimizer
    ):
        check_offloadable(optimizer)
        optimizer = HostOffloadOptimizer(optimizer)
    return optimizer


def bias_variables(entries, mode):
    """Bias variables that `mode` makes trainable.

    Args:
        entries: `(layer, has_lora)` pairs for every layer of the model.
        mode: "none", "all" (every layer's `bias`), or "lora_only" (biases
            of the layers that carry a LoRA adapter), as PEFT's `bias`.
    """
    if mode == "none":
        return []
    found = []
    for layer, has_lora in entries:
        bias = getattr(layer, "bias", None)
        if not isinstance(bias, keras.Variable):
            continue
        if mode == "all" or has_lora:
            found.append(bias)
    return found


def _is_selector(value):
    return isinstance(value, (str, list, tuple, re.Pattern)) or callable(value)
