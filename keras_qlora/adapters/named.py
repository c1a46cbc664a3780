"""Several named adapters on one model: add, switch, disable, delete.

Every LoRA layer holds the same adapters (see `QLoRALayerBase`); the
functions here act on all of them at once. "default" is the pair `apply()`
created (the layers' `lora_a` / `lora_b`). Only the active adapter is used
and trainable. After switching, compile again before `fit`: an optimizer
is built for one set of variables.

`modules_to_save` layers (a task head) exist once in the model. Their
values travel with the active adapter: switching stores the current values
under the adapter being left (host memory) and brings back the values kept
for the adapter being activated, so each task keeps its own head. These
host copies are not part of a `.keras` file (which saves the live values);
`save_adapter` writes each adapter's own.

A `.keras` file keeps every adapter's LoRA weights and which one is active.
The adapters are re-created while the weights load, after Keras has built
a saved optimizer; a model saved compiled with another adapter than
"default" active must therefore be compiled again after loading.
"""

import numpy as np

from keras_qlora import internals
from keras_qlora import surgery
from keras_qlora.layers.adapter_slots import DEFAULT_ADAPTER
from keras_qlora.layers.adapter_slots import check_adapter_name
from keras_qlora.wrapper import require_qlora_model

# Attribute of the model holding {adapter name: {key: numpy value}} for the
# modules_to_save values of inactive adapters.
_STASH = "_qlora_module_stash"


def list_adapters(model) -> list:
    """Names of the model's adapters, "default" first.

    Example:
    >>> keras_qlora.list_adapters(model)
    ['default', 'task_b']
    """
    return list(_state(lora_layers(model, "list_adapters"))[0])


def active_adapter(model) -> str:
    """Name of the adapter the model uses (when adapters are enabled)."""
    return _state(lora_layers(model, "active_adapter"))[1]


def adapters_enabled(model) -> bool:
    """False after `disable_adapters`: the model is then the NF4 base."""
    return _state(lora_layers(model, "adapters_enabled"))[2]


def add_adapter(model, name: str):
    """Adds a freshly initialized adapter `name` to every LoRA layer.

    It is not active; `set_adapter(model, name)` and compile to train it.

    Args:
        model: a `QLoRAModel` from `keras_qlora.apply()`.
        name: 1-64 letters, digits, "_" or "-", not yet used.

    Raises:
        TypeError: not a `QLoRAModel`, or a non-string name.
        ValueError: the model has no LoRA layer; a taken or invalid name.

    Example:
    >>> keras_qlora.add_adapter(model, "task_b")
    >>> keras_qlora.set_adapter(model, "task_b")
    """
    layers = lora_layers(model, "add_adapter")
    name = check_adapter_name(name)
    names = _state(layers)[0]
    if name in names:
        raise ValueError(
            f"The model already has an adapter named {name!r}. Its "
            f"adapters: {list(names)}"
        )
    for layer in layers.values():
        layer.add_adapter(name)


def set_adapter(model, name: str):
    """Makes `name` the active (and only trainable) adapter.

    Also brings in that adapter's `modules_to_save` values, if it has its
    own. Compile again before training: the optimizer was built for the
    previous adapter's variables.

    Raises:
        TypeError: not a `QLoRAModel`, or a non-string name.
        ValueError: no adapter of that name (the message lists them).

    Example:
    >>> keras_qlora.load_adapter(model, "adapters/b", name="b")
    >>> keras_qlora.set_adapter(model, "b")
    """
    layers = lora_layers(model, "set_adapter")
    names, active, _ = _state(layers)
    _check_known(name, names)
    if name != active:
        variables = module_variables(model)
        if variables:
            stash = _stash(model)
            stash[active] = {k: v.numpy() for k, v in variables.items()}
            values = stash.pop(name, None)
            if values is not None:
                for key, variable in variables.items():
                    variable.assign(values[key])
    for layer in layers.values():
        layer.set_adapter_state(active=name)
    _reset_compiled_functions(model)


def disable_adapters(model):
    """Turns all adapters off: the model computes with its NF4 base only.

    No adapter is trainable while disabled. `modules_to_save` layers keep
    their current values (their float originals are not kept).

    Example:
    >>> keras_qlora.disable_adapters(model)   # base model outputs
    >>> keras_qlora.enable_adapters(model)
    """
    _set_enabled(model, False, "disable_adapters")


def enable_adapters(model):
    """Turns adapters back on after `disable_adapters`."""
    _set_enabled(model, True, "enable_adapters")


def delete_adapter(model, name: str):
    """Deletes adapter `name` (its variables, and its kept head values).

    Raises:
        TypeError: not a `QLoRAModel`, or a non-string name.
        ValueError: unknown name, "default", or the active adapter.

    Example:
    >>> keras_qlora.set_adapter(model, "default")
    >>> keras_qlora.delete_adapter(model, "b")
    """
    layers = lora_layers(model, "delete_adapter")
    names, active, _ = _state(layers)
    _check_known(name, names)
    if name in (DEFAULT_ADAPTER, active):
        raise ValueError(
            f"Cannot delete adapter {name!r}: the {DEFAULT_ADAPTER!r} adapter "
            "(the layers' own lora_a/lora_b) and the active adapter "
            f"({active!r}) stay. Call set_adapter() with another first."
        )
    for layer in layers.values():
        layer.delete_adapter(name)
    _stash(model).pop(name, None)


# -- shared with adapter files ------------------------------------------------


def lora_layers(model, caller) -> dict:
    """`{path: layer}` of the model's LoRA layers; checks the model."""
    require_qlora_model(model, caller)
    layers = model.qlora_layers(lora_only=True)
    if not layers:
        raise ValueError(
            f"keras_qlora.{caller}(): model '{model.name}' has no LoRA "
            "layers (was apply() given target_modules that matched none?)."
        )
    return layers


def module_variables(model) -> dict:
    """`{"<layer path>/<variable name>": variable}` of `modules_to_save`.

    Paths are those of `summary()`; a module's sublayers appear under it.

    Raises:
        ValueError: a recorded path is missing, or two variables of one
            layer share a name.
    """
    by_path = {e.path: e.layer for e in surgery.walk(model.base_model)}
    out = {}
    for path in model.qlora_report.get("modules_to_save", []):
        if path not in by_path:
            raise ValueError(
                f"modules_to_save layer '{path}' is not in the model."
            )
        root = by_path[path]
        subs = [(path, root)] + [
            (f"{path}/{e.path}", e.layer) for e in surgery.walk(root)
        ]
        for sub_path, layer in subs:
            for variable in internals.own_variables(layer):
                key = f"{sub_path}/{variable.name}"
                if key in out:
                    raise ValueError(
                        f"Layer '{sub_path}' has two variables named "
                        f"'{variable.name}'; cannot key them by name."
                    )
                out[key] = variable
    return out


def module_values(model, name) -> dict:
    """The `modules_to_save` values that belong to adapter `name`."""
    kept = _stash(model).get(name)
    if kept is not None:
        return {k: np.array(v) for k, v in kept.items()}
    return {k: v.numpy() for k, v in module_variables(model).items()}


def keep_module_values(model, name, values):
    """Stores `values` as the `modules_to_save` values of inactive `name`."""
    _stash(model)[name] = {k: np.array(v) for k, v in values.items()}


# -- private ---------------------------------------------------------------


def _state(layers):
    """`(names, active, enabled)`, the same on every LoRA layer."""
    states = {
        (layer.adapter_names, layer.active_adapter, bool(layer.lora_enabled))
        for layer in layers.values()
    }
    if len(states) != 1:
        raise ValueError(
            "The model's LoRA layers disagree on their adapters (changed "
            "one by one?): " + "; ".join(sorted(map(str, states)))
        )
    return states.pop()


def _check_known(name, names):
    check_adapter_name(name)
    if name not in names:
        raise ValueError(
            f"The model has no adapter named {name!r}. Its adapters: "
            f"{list(names)}"
        )


def _set_enabled(model, enabled, caller):
    layers = lora_layers(model, caller)
    _state(layers)
    for layer in layers.values():
        layer.set_adapter_state(enabled=enabled)
    _reset_compiled_functions(model)


def _stash(model):
    stash = vars(model).get(_STASH)
    if stash is None:
        stash = {}
        # object.__setattr__: Keras would wrap the dict in a tracked one.
        object.__setattr__(model, _STASH, stash)
    return stash


def _reset_compiled_functions(model):
    # Traced predict/train functions captured the previous adapter's
    # variables; Keras rebuilds them when they are None.
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
