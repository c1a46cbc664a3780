"""Training options of a QLoRA model: what trains, and the optimizer setup.

`apply(..., bias=, offload_optimizer=, optimizer_8bit=,
gradient_checkpointing=, attention_chunk_size=, lm_loss_chunk_size=)` makes
one `TrainingOptions`, which the `QLoRAModel` carries; they are applied when
the model is compiled (optimizer), built (biases, checkpointed blocks,
chunked attention) or trained (chunked LM loss).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import keras

from keras_qlora import selectors
from keras_qlora.chunked import attention_layers
from keras_qlora.chunked import lm_loss
from keras_qlora.chunked.attention_layers import check_chunk_size
from keras_qlora.training.adam8bit import AdamW8bit
from keras_qlora.training.offload import HostOffloadOptimizer
from keras_qlora.training.offload import resolve_optimizer

BIAS_MODES = ("none", "all", "lora_only")


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """What trains besides the adapters, and how the optimizer is set up.

    Validated where it is made; `QLoRAModel` carries it whole and saves it
    with `to_dict` (a `gradient_checkpointing` selector is saved as the
    exact block paths it matched).

    Attributes:
        bias: which biases train, as PEFT's `bias`: "none", "all" or
            "lora_only".
        offload_optimizer: keep the optimizer state in host memory.
        optimizer_8bit: store Adam/AdamW moments in 8 bits.
        gradient_checkpointing: False, True (detect transformer blocks) or
            a selector of the blocks to recompute (list of names, regex,
            `re.Pattern`, callable).
        attention_chunk_size: None, or the query chunk (and key block) size
            of chunked attention (`keras_qlora.chunked.attention_layers`).
        lm_loss_chunk_size: None, or the sequence chunk of the chunked
            LM-head cross-entropy in `fit` (`keras_qlora.chunked.lm_loss`).

    Raises:
        TypeError / ValueError: a value of the wrong type / out of range.
    """

    bias: str = "none"
    offload_optimizer: bool = False
    optimizer_8bit: bool = False
    gradient_checkpointing: Any = False
    attention_chunk_size: Any = None
    lm_loss_chunk_size: Any = None

    def __post_init__(self):
        check_chunk_size(self.attention_chunk_size, "attention_chunk_size")
        check_chunk_size(self.lm_loss_chunk_size, "lm_loss_chunk_size")
        if self.bias not in BIAS_MODES:
            raise ValueError(
                f"bias must be one of {BIAS_MODES}. Received: "
                f"bias={self.bias!r}"
            )
        for key in ("offload_optimizer", "optimizer_8bit"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise TypeError(
                    f"{key} must be True or False. Received: {key}={value!r}"
                )
        gc = self.gradient_checkpointing
        if gc is True or gc is False:
            return
        try:
            # The selector is checked here, once: a bad regex or list item
            # is refused before apply() edits anything.
            selectors.matcher(gc)
        except (TypeError, ValueError) as err:
            raise type(err)(
                "gradient_checkpointing must be True, False, or a selector "
                "of the blocks to rematerialize (list of names, regex, "
                f"callable). Received: gradient_checkpointing={gc!r} ({err})"
            ) from None

    def check_model(self, has_lora: bool):
        """Refuses optimizer options on a model that has nothing to train.

        Args:
            has_lora: whether any replaced layer carries a LoRA adapter.

        Raises:
            ValueError: `offload_optimizer` or `optimizer_8bit` without LoRA.
        """
        for key in ("offload_optimizer", "optimizer_8bit"):
            if getattr(self, key) and not has_lora:
                raise ValueError(
                    f"{key}=True needs LoRA adapters to train, but the model "
                    "has no LoRA layers (target_modules=None or matched "
                    f"nothing). Pass target_modules, or drop {key}."
                )

    def check_long_context(self, model):
        """Refuses the chunking options on a model they cannot apply to.

        Args:
            model: the model `apply()` edits (or its `QLoRAModel`).

        Raises:
            ValueError: `attention_chunk_size` without a supported attention
                layer; `lm_loss_chunk_size` on a model that is not a
                keras_hub CausalLM.
        """
        if self.attention_chunk_size is not None:
            if not attention_layers.attention_layers(model):
                raise ValueError(
                    f"attention_chunk_size: model '{model.name}' has no "
                    "attention layer that chunked attention supports. "
                    f"Supported: {attention_layers.RECOGNIZED_LAYERS}."
                )
        if self.lm_loss_chunk_size is not None:
            lm_loss.causal_lm_parts(model)

    def to_dict(self) -> dict:
        """The options as a dict (a selector is left as it is)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config) -> "TrainingOptions":
        """Options from a dict; missing keys take the defaults.

        Raises:
            ValueError: an unknown key; TypeError / ValueError: bad values.
        """
        if isinstance(config, cls):
            return config
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(
                "Training options must be a dict (or a TrainingOptions, or "
                f"None). Received: {type(config).__name__} {config!r}"
            )
        known = field_names()
        unknown = sorted(set(config or {}) - set(known))
        if unknown:
            raise ValueError(
                f"Unknown training options {unknown}. Known: {sorted(known)}"
            )
        return cls(**dict(config or {}))

    def replace(self, **changes) -> "TrainingOptions":
        """A copy with `changes` (validated)."""
        return dataclasses.replace(self, **changes)

    def __getitem__(self, key):
        # Read access by name, as the dict this object replaced.
        if key not in field_names():
            raise KeyError(key)
        return getattr(self, key)


def field_names() -> tuple:
    """The training options' names, as `apply()` takes them."""
    return tuple(f.name for f in dataclasses.fields(TrainingOptions))


def prepare_optimizer(optimizer, options):
    """The optimizer to compile with, after the 8-bit / offload options.

    Args:
        optimizer: what the user passed to `compile` (instance or name).
        options: the model's `TrainingOptions`.

    Returns:
        A Keras optimizer: converted to `AdamW8bit` when `optimizer_8bit`,
        wrapped in `HostOffloadOptimizer` when `offload_optimizer`.

    Raises:
        TypeError: the optimizer cannot be made 8-bit or offloaded.
    """
    optimizer = resolve_optimizer(optimizer, "compile(optimizer=...)")
    if options.optimizer_8bit:
        optimizer = _to_8bit(optimizer)
    if options.offload_optimizer and not isinstance(
        optimizer, HostOffloadOptimizer
    ):
        # HostOffloadOptimizer refuses what it cannot offload.
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


def _to_8bit(optimizer):
    """`optimizer` as an `AdamW8bit` (inside the `HostOffloadOptimizer`
    it may come in)."""
    if isinstance(optimizer, HostOffloadOptimizer):
        inner = _to_8bit(optimizer.inner_optimizer)
        if inner is optimizer.inner_optimizer:
            return optimizer
        return HostOffloadOptimizer(
            inner, host_device=optimizer.host_device, name=optimizer.name
        )
    if isinstance(optimizer, AdamW8bit):
        return optimizer
    try:
        return AdamW8bit.from_optimizer(optimizer)
    except (TypeError, ValueError) as err:
        raise type(err)(
            "compile(): apply(optimizer_8bit=True) converts the optimizer to "
            f"keras_qlora.training.AdamW8bit, which needs an Adam or AdamW. "
            f"{err}"
        ) from None
