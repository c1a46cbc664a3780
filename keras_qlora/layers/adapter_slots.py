"""Named LoRA adapters of a QLoRA layer (a mixin of `QLoRALayerBase`).

Besides its own pair ("default", the variables `lora_a` / `lora_b`), a
layer can hold more LoRA pairs, stored as `lora_a_<name>` / `lora_b_<name>`;
one is active, and only the active pair is used in `call` and trainable.
All pairs have the layer's rank, alpha and dropout.
"""

import re

from keras_qlora import internals

# The adapter whose pair is the layer's own `lora_a` / `lora_b`.
DEFAULT_ADAPTER = "default"
# Names end up in variable names, attribute names and file keys.
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class AdapterSlotsMixin:
    """Adds, selects and deletes named LoRA pairs; see the module doc.

    The host class provides `rank`, `kernel_2d_shape`, `lora_a`, `lora_b`,
    `lora_enabled`, `active_adapter`, `_extra_adapters`,
    `_add_lora_pair(suffix, trainable)` and `_require_built(what)`.
    """

    @property
    def adapter_names(self) -> tuple:
        """Names of the LoRA pairs: "default" first, then the others sorted.

        Empty for a layer without LoRA (`rank=None`).
        """
        if self.rank is None:
            return ()
        return (DEFAULT_ADAPTER,) + self._extra_adapters

    def adapter_variables(self, name: str) -> tuple:
        """`(lora_a, lora_b)` of the adapter `name`.

        Raises:
            ValueError: the layer has no adapter of that name.
        """
        self._check_adapter(name)
        if name == DEFAULT_ADAPTER:
            return self.lora_a, self.lora_b
        return getattr(self, f"lora_a_{name}"), getattr(self, f"lora_b_{name}")

    def add_adapter(self, name: str):
        """Adds a LoRA pair `name` (kaiming-uniform A, zero B), inactive and
        not trainable.

        Raises:
            ValueError: an unbuilt layer or one without LoRA, or a taken or
                invalid name (1-64 letters, digits, "_" or "-").
        """
        self._require_built("add_adapter")
        if self.rank is None:
            raise ValueError(
                f"Layer '{self.name}' has no LoRA adapter (rank=None), so it "
                f"cannot hold named adapters. Received: name={name!r}"
            )
        name = check_adapter_name(name)
        if name in self.adapter_names:
            raise ValueError(
                f"Layer '{self.name}' already has an adapter named {name!r}. "
                f"Its adapters: {list(self.adapter_names)}"
            )
        # A built layer locks its state; Keras' own enable_lora() lifts the
        # lock around adding its LoRA weights in the same way.
        with internals.unlocked_state(self):
            lora_a, lora_b = self._add_lora_pair(f"_{name}", trainable=False)
            setattr(self, f"lora_a_{name}", lora_a)
            setattr(self, f"lora_b_{name}", lora_b)
        self._extra_adapters = tuple(sorted(self._extra_adapters + (name,)))

    def set_adapter_state(self, active=None, enabled=None):
        """Selects the adapter used in `call` and/or turns LoRA on or off.

        Only the active adapter is trainable, and none while LoRA is off
        (the layer is then the NF4 base alone).

        Args:
            active: an adapter name, or None to keep the active one.
            enabled: True/False, or None to keep the current setting.
        """
        if active is not None:
            self._check_adapter(active)
            self.active_adapter = active
        if enabled is not None:
            self.lora_enabled = bool(enabled)
        for name in self.adapter_names:
            train = self.lora_enabled and name == self.active_adapter
            for variable in self.adapter_variables(name):
                variable.trainable = train

    def delete_adapter(self, name: str):
        """Removes the adapter `name` and its variables.

        Raises:
            ValueError: unknown `name`, "default" (the layer's own pair) or
                the active adapter.
        """
        self._check_adapter(name)
        if name in (DEFAULT_ADAPTER, self.active_adapter):
            raise ValueError(
                f"Layer '{self.name}': cannot delete adapter {name!r}: the "
                f"{DEFAULT_ADAPTER!r} adapter (the layer's own lora_a/lora_b) "
                "and the active one stay. Activate another adapter first."
            )
        # Layer.__delattr__ untracks the variable (Keras and TF side).
        delattr(self, f"lora_a_{name}")
        delattr(self, f"lora_b_{name}")
        self._extra_adapters = tuple(
            n for n in self._extra_adapters if n != name
        )

    def _pair_shapes(self):
        k, n = self.kernel_2d_shape
        return (k, self.rank), (self.rank, n)

    def _check_adapter(self, name):
        if name not in self.adapter_names:
            raise ValueError(
                f"Layer '{self.name}' has no adapter named {name!r}. Its "
                f"adapters: {list(self.adapter_names)}"
            )


def check_adapter_name(name, arg="name") -> str:
    """Returns `name` if it is a valid adapter name, or raises naming it
    (as the argument `arg`)."""
    if not isinstance(name, str):
        raise TypeError(
            f"An adapter name must be a string. Received: {arg}={name!r}"
        )
    if not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            "An adapter name must be 1-64 letters, digits, '_' or '-'. "
            f"Received: {arg}={name!r}"
        )
    return name
