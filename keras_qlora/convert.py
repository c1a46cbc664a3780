"""Converting selected layers to QLoRA layers, and freezing the rest.

The mechanics under `apply()` (which decides *which* layers) and under
`QLoRAModel.from_config` (which rebuilds the recorded layers of a saved
model before its weights load).
"""

import ctypes
import gc
import platform
import warnings

import keras
import numpy as np

from keras_qlora import surgery
from keras_qlora.layers import QLoRADense
from keras_qlora.layers import QLoRAEinsumDense
from keras_qlora.layers import QLoRALayerBase

_CONVERTERS = (
    (keras.layers.EinsumDense, QLoRAEinsumDense),
    (keras.layers.Dense, QLoRADense),
)


def restore(model, settings, replaced, modules_to_save):
    """Rebuilds a saved model's QLoRA structure (zero weights, to be loaded).

    `settings` is the model's `QLoRASettings`; `replaced` lists
    `{"path", "lora"}` as recorded by `rewrite`. Layers that the base
    model's config already rebuilt as QLoRA layers (top-level layers of a
    Functional model) are kept as they are.
    """
    by_path = {f.path: f for f in surgery.walk(model)}
    plan = []
    for item in replaced:
        entry = by_path.get(item["path"])
        if entry is None:
            raise ValueError(
                f"The saved QLoRA model has a layer '{item['path']}' that the "
                "rebuilt base model does not have. Its layers are: "
                f"{', '.join(sorted(by_path))}"
            )
        if convertible(entry.layer):
            plan.append((entry, bool(item["lora"])))
        elif not isinstance(entry.layer, QLoRALayerBase):
            raise ValueError(
                f"Layer '{item['path']}' was saved as a QLoRA layer but was "
                f"rebuilt as {type(entry.layer).__name__}."
            )
        else:
            _check_same_settings(entry, settings.for_layer(item["lora"]))
    execute(plan, settings, quantize=False, verbose=False)
    freeze(model, list(modules_to_save))


def _check_same_settings(entry, settings):
    """One source of truth: a layer rebuilt from its own config must agree
    with the model's settings (an edited config would otherwise compute
    with one and report, or save adapters with, the other)."""
    own = entry.layer.settings.layer_config()
    want = settings.layer_config()
    diffs = {k: (own[k], want[k]) for k in want if own[k] != want[k]}
    if diffs:
        shown = ", ".join(
            f"{k}: layer {a!r}, model {b!r}" for k, (a, b) in diffs.items()
        )
        raise ValueError(
            f"Layer '{entry.path}' of the saved model disagrees with the "
            f"model's settings ({shown}); the file was edited or is corrupt."
        )


def execute(plan, settings, quantize, verbose, prebuilt=None):
    """Replaces each `(Found, with_lora)` of `plan` by its QLoRA layer,
    made with `settings` (a `QLoRASettings`).

    `prebuilt` maps `id(float layer)` to its QLoRA layer whose NF4 state is
    already filled (`keras_qlora.from_preset` quantizes each kernel as the
    checkpoint is read); those float kernels are never read here.
    """
    prebuilt = prebuilt or {}
    preflight(plan, settings, quantize, prebuilt)
    if quantize:
        _warn_dropped(plan)
    replaced = []
    progress = keras.utils.Progbar(len(plan)) if verbose and plan else None
    for i, (entry, with_lora) in enumerate(plan):
        new = prebuilt.pop(id(entry.layer), None)
        if new is None:
            new = convert_layer(entry.layer, settings, with_lora, quantize)
        elif quantize:
            new.copy_bias_from(entry.layer)
        surgery.replace(entry, new)
        replaced.append(
            {
                "path": entry.path,
                "type": type(new).__name__,
                "shape": list(new.kernel_2d_shape),
                "lora": new.has_lora,
            }
        )
        entry.layer = new  # drop our reference to the float layer
        if progress is not None:
            progress.update(i + 1)
    gc.collect()
    release_free_memory()
    return replaced


def preflight(plan, settings, quantize, prebuilt=None):
    """Runs every per-layer check of `execute` over all of `plan` before
    the first layer changes, so a refusal leaves the model as it was.

    Raises:
        TypeError / ValueError: the first layer that cannot be converted
            (a rank above min(K, N), an equation that is not one matmul, a
            non-float or non-finite kernel, a layer Keras quantized or gave
            a LoRA), naming it.
    """
    prebuilt = prebuilt or {}
    for entry, with_lora in plan:
        if id(entry.layer) in prebuilt:
            continue  # checked as its kernel was read
        cls = _converter(entry.layer)
        cls.check_source(
            entry.layer, settings.for_layer(with_lora), check_values=quantize
        )


def _warn_dropped(plan):
    """Says once which float-layer settings the QLoRA layers drop."""
    dropped = {
        entry.path: names
        for entry, _ in plan
        if (names := _converter(entry.layer).dropped_from_source(entry.layer))
    }
    if dropped:
        shown = "; ".join(f"{p}: {', '.join(n)}" for p, n in dropped.items())
        warnings.warn(
            "keras_qlora.apply() drops the kernel regularizers / constraints "
            f"of {len(dropped)} layer(s), whose kernels are now frozen NF4 "
            f"({shown}). Bias and activity regularizers are kept.",
            UserWarning,
            stacklevel=4,
        )


def release_free_memory() -> bool:
    """Returns memory that glibc's malloc keeps after frees to the OS.

    Freeing a float kernel hands its bytes back to the allocator, not to the
    OS: glibc keeps freed heap chunks (and raises its mmap threshold after
    large frees, so later ones also land on the heap) and the process RSS
    stays at the float model's size. `malloc_trim(0)` gives the free pages
    of every arena back. Memory held by TensorFlow's own CPU allocator
    (the BFC pool it uses when oneDNN is on, TF's default on x86) is not
    malloc's to release and stays in that pool, where training reuses it;
    `TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1`, set before TensorFlow allocates,
    makes TF take its memory from malloc, so this call can return it.
    `apply()` calls it once all layers are converted.

    Returns:
        True when `malloc_trim` ran and released something, False otherwise
        (not glibc, nothing to release, or the call is unavailable).

    Example:
    >>> isinstance(release_free_memory(), bool)
    True
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def _malloc_trim():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def variable_bytes(model, predicate=None):
    """Bytes held by the model's variables (optionally filtered)."""
    return sum(
        nbytes(v) for v in model.weights if predicate is None or predicate(v)
    )


def nbytes(variable) -> int:
    """Bytes held by one variable (bfloat16 counted as 2)."""
    return numel(variable) * _itemsize(variable.dtype)


def _itemsize(dtype):
    name = keras.backend.standardize_dtype(dtype)
    return 2 if name == "bfloat16" else np.dtype(name).itemsize


def convertible(layer) -> bool:
    """Whether `layer` is a float linear layer a QLoRA layer can replace."""
    if isinstance(layer, QLoRALayerBase):
        return False
    return any(isinstance(layer, src) for src, _ in _CONVERTERS)


def convert_layer(layer, settings, with_lora, quantize):
    """The QLoRA layer for float `layer` (see `QLoRALayerBase.from_layer`),
    with an adapter when `with_lora`."""
    return _converter(layer).from_layer(
        layer, settings.for_layer(with_lora), quantize=quantize
    )


def _converter(layer):
    for src, cls in _CONVERTERS:
        if isinstance(layer, src):
            return cls
    raise TypeError(f"No QLoRA layer for {type(layer).__name__}")


def freeze(model, saved_paths):
    """Freezes every variable except LoRA ones and modules_to_save."""
    keep = set()
    saved = set(saved_paths)
    for entry in surgery.walk(model):
        layer = entry.layer
        if isinstance(layer, QLoRALayerBase) and layer.has_lora:
            keep.update(id(v) for v in (layer.lora_a, layer.lora_b))
        if entry.path in saved:
            keep.update(id(v) for v in layer.weights)
    for v in model.weights:
        v.trainable = id(v) in keep


def numel(variable) -> int:
    return int(np.prod(variable.shape, dtype=np.int64))
