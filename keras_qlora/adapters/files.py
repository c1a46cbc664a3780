"""Adapter files: `save_adapter` / `load_adapter`.

An adapter is a directory with `adapter_config.json` (settings, target
paths, base-model fingerprint, weights checksum; see `config`) and
`adapter_model.safetensors`: `<layer path>/lora_a`, `<layer path>/lora_b`
for every LoRA layer and `<layer path>/<variable name>` for every
`modules_to_save` variable, as PEFT also stores those. No pickle.

Loading checks everything (config types, settings, targets, fingerprint,
checksum, keys, shapes, dtypes, finiteness) before it assigns anything, so
a failed load leaves the model as it was.
"""

import dataclasses
import hashlib
import os

import keras
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from keras_qlora import atomic
from keras_qlora.adapters import config as cfg
from keras_qlora.adapters import fingerprint as fp
from keras_qlora.adapters import named
from keras_qlora.atomic import NonFiniteError  # noqa: F401 (re-exported)
from keras_qlora.layers.adapter_slots import DEFAULT_ADAPTER
from keras_qlora.layers.adapter_slots import check_adapter_name

# safetensors dtypes numpy reads (little-endian, as the format stores them).
_NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}


def save_adapter(model, path, overwrite: bool = False, name=None) -> str:
    """Writes one adapter of `model` to the directory `path`, atomically.

    Args:
        model: a `QLoRAModel` from `keras_qlora.apply()`.
        path: the directory to create.
        overwrite: replace an existing adapter directory at `path`; the old
            one stays in place if writing the new one fails.
        name: the adapter to save; None saves the active one.

    Returns:
        The absolute path written.

    Raises:
        TypeError: not a `QLoRAModel`, a non-string `name` or a non-bool
            `overwrite`.
        FileExistsError: `path` exists and `overwrite` is False.
        ValueError: unknown adapter name; weights that hold NaN or Inf
            (a diverged run: `load_adapter` could not load them, so
            nothing is written and an existing adapter stays); or `path`
            exists but is not an adapter directory (never replaced, even
            with `overwrite`).

    Example:
    >>> keras_qlora.save_adapter(model, "adapters/sst2")
    """
    layers = named.lora_layers(model, "save_adapter")
    name = (
        named.active_adapter(model)
        if name is None
        else check_adapter_name(name)
    )
    if name not in named.list_adapters(model):
        raise ValueError(
            f"The model has no adapter named {name!r}. Its adapters: "
            f"{named.list_adapters(model)}"
        )
    target = os.path.abspath(os.fspath(path))
    atomic.check_replaceable(
        target, overwrite, cfg.CONFIG_FILE, "an adapter directory"
    )
    with atomic.staging_dir(target) as tmp:
        _write(model, layers, tmp, name)
        atomic.commit_dir(tmp, target, overwrite=overwrite)
    return target


def load_adapter(model, path, name: str = DEFAULT_ADAPTER):
    """Loads the adapter in directory `path` into `model` as `name`.

    The model must come from `apply()` with the same settings (rank,
    alpha, use_rslora, NF4 settings, targets, modules_to_save) on the same
    base weights. A new `name` adds an adapter (not activated: see
    `set_adapter`); an existing one has its weights replaced. Dropout may
    differ: it only acts in training.

    Args:
        model: a `QLoRAModel`.
        path: a directory written by `save_adapter`.
        name: the adapter to load into.

    Raises:
        TypeError: not a `QLoRAModel`, or a non-string name.
        FileNotFoundError: `path` or one of its files is missing.
        ValueError: the adapter does not fit the model (the message names
            the settings, layers or keys that differ), or its files are
            corrupt. Nothing is assigned then.

    Example:
    >>> model = keras_qlora.apply(backbone, rank=8)
    >>> keras_qlora.load_adapter(model, "adapters/sst2")
    """
    prepare_load(model, path, name).apply()


@dataclasses.dataclass
class LoadPlan:
    """A checked adapter, ready to assign (see `prepare_load`)."""

    model: object
    name: str
    lora: list  # (layer, "lora_a" | "lora_b", value)
    modules: dict  # key -> value

    def apply(self):
        """Assigns the checked values; creates the adapter if it is new."""
        layers = {id(layer): layer for layer, _, _ in self.lora}
        if self.name not in named.list_adapters(self.model):
            for layer in layers.values():
                layer.add_adapter(self.name)
        for layer, which, value in self.lora:
            lora_a, lora_b = layer.adapter_variables(self.name)
            (lora_a if which == "lora_a" else lora_b).assign(value)
        if not self.modules:
            return
        if self.name == named.active_adapter(self.model):
            variables = named.module_variables(self.model)
            for key, value in self.modules.items():
                variables[key].assign(value)
        else:
            named.keep_module_values(self.model, self.name, self.modules)


def prepare_load(model, path, name: str = DEFAULT_ADAPTER) -> LoadPlan:
    """Reads and checks an adapter for `model`; assigns nothing.

    Raises: as `load_adapter`.
    """
    layers = named.lora_layers(model, "load_adapter")
    name = check_adapter_name(name)
    directory = os.path.abspath(os.fspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No adapter directory at {directory}")
    config_path = os.path.join(directory, cfg.CONFIG_FILE)
    weights_path = os.path.join(directory, cfg.WEIGHTS_FILE)
    saved = cfg.parse(_read(config_path), config_path)
    data = _read(weights_path)
    modules = named.module_variables(model)
    expected = _config(model, layers, name, base_model=None)
    cfg.check_compatible(saved, expected, directory)
    _check_fingerprint(saved, model, directory)
    if hashlib.sha256(data).hexdigest() != saved["weights_sha256"]:
        raise ValueError(
            f"{weights_path} does not match the checksum in "
            f"{cfg.CONFIG_FILE}: the file is corrupt or was replaced."
        )
    tensors = _parse_safetensors(data, weights_path)
    variables = dict(modules)
    for path_, layer in layers.items():
        variables[f"{path_}/lora_a"] = layer.lora_a
        variables[f"{path_}/lora_b"] = layer.lora_b
    _check_tensors(tensors, variables, weights_path)
    lora = [
        (layer, which, tensors[f"{p}/{which}"])
        for p, layer in layers.items()
        for which in ("lora_a", "lora_b")
    ]
    values = {k: tensors[k] for k in modules}
    return LoadPlan(model=model, name=name, lora=lora, modules=values)


def write_adapter(model, directory, name=None):
    """Writes adapter files into an existing (staging) directory."""
    layers = named.lora_layers(model, "save_adapter")
    name = named.active_adapter(model) if name is None else name
    _write(model, layers, directory, name)


# -- private ---------------------------------------------------------------


def _write(model, layers, directory, name):
    tensors = {}
    for path, layer in layers.items():
        lora_a, lora_b = layer.adapter_variables(name)
        tensors[f"{path}/lora_a"] = lora_a.numpy()
        tensors[f"{path}/lora_b"] = lora_b.numpy()
    tensors.update(named.module_values(model, name))
    tensors = {k: np.require(v, requirements="C") for k, v in tensors.items()}
    refuse_non_finite(tensors, name)
    data = safetensors.numpy.save(tensors, metadata={"format": cfg.FORMAT})
    config = _config(model, layers, name, fp.fingerprint(model.qlora_layers()))
    config["weights_sha256"] = hashlib.sha256(data).hexdigest()
    atomic.write_bytes(os.path.join(directory, cfg.WEIGHTS_FILE), data)
    atomic.write_bytes(
        os.path.join(directory, cfg.CONFIG_FILE), cfg.dumps(config)
    )


def refuse_non_finite(tensors, name):
    """Raises `NonFiniteError` naming the tensors of adapter `name` that
    hold NaN or Inf."""
    atomic.refuse_non_finite(
        {
            key: int(value.size - np.isfinite(value).sum())
            for key, value in tensors.items()
            if np.issubdtype(value.dtype, np.floating)
        },
        f"Adapter {name!r}",
    )


def _config(model, layers, name, base_model):
    module_paths = model.qlora_report.get("modules_to_save", [])
    return cfg.build(
        name, model.settings, list(layers), module_paths, base_model, ""
    )


def _check_fingerprint(saved, model, source):
    base = saved["base_model"]
    if base["algorithm"] != fp.ALGORITHM:
        raise ValueError(
            f"The adapter in {source} has a base-model fingerprint of kind "
            f"{base['algorithm']!r}; this keras_qlora computes "
            f"{fp.ALGORITHM!r}."
        )
    current = fp.fingerprint(model.qlora_layers())
    if base["sha256"] != current["sha256"]:
        layers = fp.differing_layers(base, current)
        shown = ", ".join(layers[:8]) + (" ..." if len(layers) > 8 else "")
        raise ValueError(
            f"The adapter in {source} was trained on a different base model: "
            f"the NF4 weights differ (fingerprint {base['sha256'][:16]}... "
            f"vs {current['sha256'][:16]}...) in {len(layers)} layer(s): "
            f"{shown or '(per-layer digests equal; the file was edited)'}"
        )


def _read(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Adapter file missing: {path}")
    with open(path, "rb") as f:
        return f.read()


def _parse_safetensors(data, source):
    """`{key: numpy array}`; bfloat16 tensors (which numpy lacks) are
    widened to float32, exactly."""
    try:
        entries = safetensors.deserialize(data)
    except safetensors.SafetensorError as err:
        raise ValueError(
            f"{source} is not a readable safetensors file ({err}); it may be "
            "truncated or corrupt."
        ) from None
    tensors = {}
    for key, entry in entries:
        dtype, raw = entry["dtype"], entry["data"]
        if dtype == "BF16":
            # bfloat16 is the top half of a float32.
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            value = bits.view(np.float32)
        elif dtype in _NUMPY_DTYPES:
            value = np.frombuffer(raw, dtype=_NUMPY_DTYPES[dtype]).copy()
        else:
            raise ValueError(
                f"{source}: tensor '{key}' has dtype {dtype}, which "
                "keras_qlora cannot read; adapter weights are F16, BF16, F32 "
                "or F64."
            )
        tensors[key] = value.reshape(entry["shape"])
    return tensors


def _check_tensors(tensors, variables, source):
    unknown = sorted(set(tensors) - set(variables))
    missing = sorted(set(variables) - set(tensors))
    if unknown or missing:
        raise ValueError(
            f"{source} does not hold this model's adapter weights: unknown "
            f"keys {unknown[:8]}, missing keys {missing[:8]}."
        )
    for key, variable in variables.items():
        value = tensors[key]
        want = tuple(variable.shape)
        if tuple(value.shape) != want:
            raise ValueError(
                f"{source}: '{key}' has shape {tuple(value.shape)}; the "
                f"model's variable has shape {want}."
            )
        if not np.issubdtype(value.dtype, np.floating) and value.dtype != (
            np.dtype(variable.dtype)
        ):
            raise ValueError(
                f"{source}: '{key}' has dtype {value.dtype}; expected a "
                f"float dtype or {variable.dtype}."
            )
        if np.issubdtype(value.dtype, np.floating):
            # Checked after the cast the assignment will make: a float64
            # 1e300 is finite, and inf once float32.
            with np.errstate(over="ignore"):
                value = value.astype(_numpy_dtype(variable.dtype))
            if not np.all(np.isfinite(value)):
                raise ValueError(
                    f"{source}: '{key}' holds NaN or Inf values (as "
                    f"{value.dtype}, the variable's dtype)."
                )
            tensors[key] = value


def _numpy_dtype(dtype):
    name = keras.backend.standardize_dtype(dtype)
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)
