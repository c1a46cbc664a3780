"""`QLoRASettings`: the LoRA adapter and NF4 quantization settings.

One frozen object, made once from `apply()`'s keyword arguments (or a
layer's constructor arguments, or a saved config) and validated where it is
made; `convert`, the QLoRA layers and `QLoRAModel` carry it whole. Wrong
types raise `TypeError`, wrong values `ValueError`, each naming the
argument as the caller spelled it.

Two spellings exist for file-format reasons: `apply()` and a saved
`QLoRAModel` config say `alpha` / `dropout`; a saved layer config says
`lora_alpha` / `lora_dropout` (as Keras' own LoRA does). `LAYER_KEYS` is
the one table between them.
"""

import dataclasses
import math

import numpy as np

from keras_qlora.quantizers.state import check_block_size
from keras_qlora.quantizers.state import check_quant_type

# Setting -> its key in a layer's config (`get_config`); `scale_search`
# only matters while quantizing and is not part of a layer's config.
LAYER_KEYS = {
    "rank": "rank",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "use_rslora": "use_rslora",
    "block_size": "block_size",
    "double_quant": "double_quant",
    "quant_type": "quant_type",
}


@dataclasses.dataclass(frozen=True)
class QLoRASettings:
    """How a layer is quantized and adapted.

    Attributes:
        rank: LoRA rank r, a positive int; None for a frozen NF4 layer with
            no adapter.
        alpha: LoRA alpha; the adapter output is scaled by alpha / r (a
            finite number).
        dropout: dropout rate on the adapter's input, in [0, 1).
        use_rslora: scale by alpha / sqrt(r) instead (rank-stabilized).
        block_size: 4-bit elements per scale: 32, 64, 128 or 256.
        double_quant: store the block scales as 8-bit codes.
        scale_search: pick each block's scale by least squares while
            quantizing (see `keras_qlora.quantizers.quantize_nf4`).
        quant_type: the frozen weight's base format: "nf4" (default),
            "fp4" (bitsandbytes' 4-bit float, same blocks and double
            quant) or "int8" (one scale per output; `block_size`,
            `double_quant` and `scale_search` do not apply to it).

    Raises:
        TypeError: a setting of the wrong type (e.g. `rank=2.0`).
        ValueError: a setting out of range (e.g. `rank=0`, `block_size=48`).

    Example:
    >>> s = QLoRASettings(rank=4, alpha=8)
    >>> s.lora_scale, s.to_dict()["block_size"]
    (2.0, 64)
    """

    rank: int | None = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    block_size: int = 64
    double_quant: bool = True
    scale_search: bool = True
    quant_type: str = "nf4"

    def __post_init__(self):
        checked = _checked(dataclasses.asdict(self), {}, "")
        for key, value in checked.items():
            object.__setattr__(self, key, value)

    @property
    def has_lora(self) -> bool:
        """Whether these settings give a layer a LoRA adapter."""
        return self.rank is not None

    @property
    def stores_double_quant(self) -> bool:
        """Whether the frozen weight holds 8-bit block scales: `double_quant`
        with a 4-bit format (int8 has one float32 scale per output)."""
        return self.double_quant and self.quant_type != "int8"

    def state_block_size(self, k: int) -> int:
        """The block size of the stored weight of a `[k, N]` kernel: K for
        int8 (a block is a row of `W^T`), else `block_size`."""
        return int(k) if self.quant_type == "int8" else self.block_size

    @property
    def lora_scale(self) -> float:
        """Multiplier of the LoRA product: alpha / r, or alpha / sqrt(r)."""
        if self.rank is None:
            return 0.0
        denom = math.sqrt(self.rank) if self.use_rslora else self.rank
        return self.alpha / denom

    def for_layer(self, with_lora: bool) -> "QLoRASettings":
        """These settings for one layer: without an adapter unless
        `with_lora`."""
        return self if with_lora else dataclasses.replace(self, rank=None)

    def replace(self, **changes) -> "QLoRASettings":
        """A copy with `changes` (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The settings as JSON-ready Python values (`apply()`'s names)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> "QLoRASettings":
        """Settings from `to_dict()` output (missing keys take defaults).

        Raises:
            TypeError: `config` is not a dict.
            ValueError: an unknown key, or a bad value.
        """
        if not isinstance(config, dict):
            raise TypeError(
                "QLoRA settings must be a dict. Received: "
                f"{type(config).__name__}"
            )
        unknown = sorted(set(config) - set(field_names()))
        if unknown:
            raise ValueError(
                f"Unknown QLoRA settings {unknown}. Known: {field_names()}"
            )
        return cls(**config)

    def layer_config(self) -> dict:
        """The settings as a layer's config stores them (`LAYER_KEYS`)."""
        values = dataclasses.asdict(self)
        return {key: values[field] for field, key in LAYER_KEYS.items()}

    @classmethod
    def from_layer_config(
        cls, config: dict, layer_name: str, scale_search: bool = True
    ) -> "QLoRASettings":
        """Settings from a layer's arguments in the `LAYER_KEYS` spelling;
        missing ones take the layer defaults (no adapter, alpha 16, NF4
        blocks of 64 with double quantization).

        Raises:
            TypeError / ValueError: as the class, the message prefixed with
                the layer's name and using the layer's argument names; an
                unknown argument.
        """
        by_key = {key: field for field, key in LAYER_KEYS.items()}
        unknown = sorted(set(config) - set(by_key))
        if unknown:
            raise TypeError(
                f"Layer '{layer_name}': unknown QLoRA arguments {unknown}. "
                f"Known: {sorted(by_key)}"
            )
        values = {"rank": None, "scale_search": scale_search}
        values.update({by_key[key]: value for key, value in config.items()})
        names = {f: k for f, k in LAYER_KEYS.items() if f != k}
        return cls(**_checked(values, names, f"Layer '{layer_name}': "))

    def __getitem__(self, key):
        # Read access by name, as the dict this object replaced.
        if key not in field_names():
            raise KeyError(key)
        return getattr(self, key)


def field_names() -> tuple:
    """The settings' names, in `apply()`'s spelling."""
    return tuple(f.name for f in dataclasses.fields(QLoRASettings))


def _checked(values: dict, names: dict, where: str) -> dict:
    """`values` validated and normalized (ints, floats, bools).

    `names` maps a field to the argument name the caller used; `where`
    prefixes every message.
    """
    out = dict(values)

    def fail(error, field, allowed):
        name = names.get(field, field)
        raise error(
            f"{where}{name} must be {allowed}. "
            f"Received: {name}={values[field]!r}"
        )

    if "rank" in values and values["rank"] is not None:
        rank = values["rank"]
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            fail(TypeError, "rank", "a positive int or None")
        if rank <= 0:
            fail(ValueError, "rank", "a positive int or None")
        out["rank"] = int(rank)
    for field in ("alpha", "dropout"):
        if field not in values:
            continue
        value = values[field]
        if isinstance(value, bool) or not isinstance(
            value, (int, float, np.integer, np.floating)
        ):
            fail(TypeError, field, "a number")
        if not math.isfinite(float(value)):
            fail(ValueError, field, "a finite number")
        out[field] = float(value)
    if "dropout" in values and not 0.0 <= out["dropout"] < 1.0:
        fail(ValueError, "dropout", "in [0, 1)")
    for field in ("use_rslora", "double_quant", "scale_search"):
        if field in values and not isinstance(values[field], (bool, np.bool_)):
            fail(TypeError, field, "True or False")
        if field in values:
            out[field] = bool(values[field])
    if "quant_type" in values:
        try:
            out["quant_type"] = check_quant_type(values["quant_type"])
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}{err}") from None
    if "block_size" in values:
        name = names.get("block_size", "block_size")
        try:
            out["block_size"] = check_block_size(values["block_size"], name)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}{err}") from None
    return out
