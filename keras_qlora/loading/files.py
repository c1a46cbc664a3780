"""Checking a preset directory's files before anything is built from it.

`from_preset` refuses a directory that cannot load completely before it
builds the model, so a bad checkpoint never gives a half-loaded model:
missing config or weights, a shard listed in an index but absent, a
truncated safetensors or HDF5 file. Each error names the file.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

# File names keras_hub uses in its own presets, and Transformers' names.
CONFIG_FILE = "config.json"
KERAS_WEIGHTS = "model.weights.h5"
KERAS_INDEX = "model.weights.json"
TASK_WEIGHTS = "task.weights.h5"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"

# Bytes per element of the safetensors dtypes a float checkpoint can hold
# (and the integer ones, so that their sizes check too).
_SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
# A safetensors header larger than this is not a real header.
_MAX_HEADER = 100 * 2**20


def preset_format(preset) -> tuple:
    """Checks `preset` is a loadable local directory.

    Returns:
        `(kind, config, weight_files)`: kind "keras" (keras_hub's own
        format) or "transformers" (Hugging Face layout), the parsed
        config.json and the weight files that will be read.

    Raises:
        TypeError: `preset` is not a path.
        ValueError: not a directory, config.json missing or not JSON of a
            known format, weights missing, an index naming an absent shard,
            a truncated or malformed weights file.
    """
    if not isinstance(preset, (str, os.PathLike)):
        raise TypeError(
            "preset must be the path of a local preset directory. "
            f"Received: preset={preset!r} ({type(preset).__name__})"
        )
    preset = os.fspath(preset)
    if "://" in preset:
        raise ValueError(
            "keras_qlora.from_preset reads local preset directories only. "
            f"Received: preset={preset!r}. Download it first (e.g. "
            "keras_hub.utils.download_preset or huggingface-cli download) "
            "and pass the directory."
        )
    if not os.path.isdir(preset):
        raise ValueError(
            f"Preset directory '{preset}' does not exist or is not a directory."
        )
    config = _read_json(preset, CONFIG_FILE)
    if not isinstance(config, dict):
        raise ValueError(
            f"'{_join(preset, CONFIG_FILE)}' must hold a JSON object. "
            f"Received: {type(config).__name__}"
        )
    if "registered_name" in config:
        return "keras", config, _keras_weights(preset)
    if "model_type" in config:
        return "transformers", config, _hf_weights(preset)
    raise ValueError(
        f"'{_join(preset, CONFIG_FILE)}' is neither a keras_hub preset "
        "config (it has no 'registered_name') nor a Hugging Face "
        "Transformers config (no 'model_type'). Its keys: "
        f"{sorted(config)[:20]}"
    )


def _keras_weights(preset):
    if _exists(preset, KERAS_WEIGHTS):
        files = [KERAS_WEIGHTS]
    elif _exists(preset, KERAS_INDEX):
        index = _read_json(preset, KERAS_INDEX)
        files = _index_files(preset, KERAS_INDEX, index)
    else:
        raise ValueError(_no_weights(preset, (KERAS_WEIGHTS, KERAS_INDEX)))
    paths = [_join(preset, f) for f in files]
    for path in paths:
        check_h5(path)
    return paths


def _hf_weights(preset):
    if _exists(preset, HF_INDEX):
        index = _read_json(preset, HF_INDEX)
        files = _index_files(preset, HF_INDEX, index)
    elif _exists(preset, HF_WEIGHTS):
        files = [HF_WEIGHTS]
    else:
        raise ValueError(_no_weights(preset, (HF_WEIGHTS, HF_INDEX)))
    paths = [_join(preset, f) for f in files]
    for path in paths:
        check_safetensors(path)
    return paths


def _index_files(preset, name, index):
    """The shard files an index's `weight_map` names, all present."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(
            f"'{_join(preset, name)}' has no 'weight_map' (a non-empty "
            "object from tensor names to shard files)."
        )
    files = set()
    for value in weight_map.values():
        files.update(value if isinstance(value, list) else [value])
    missing = sorted(f for f in files if not _exists(preset, str(f)))
    if missing:
        raise ValueError(
            f"'{_join(preset, name)}' lists shard(s) {missing} that are not "
            f"in '{preset}'. The directory holds: {_listing(preset)}"
        )
    return sorted(files)


def check_safetensors(path) -> dict:
    """Checks a safetensors file's header and that no tensor runs past the
    end of the file (a truncated copy); reads no tensor data.

    Returns:
        `{tensor name: header entry}`, each entry's `data_offsets` made
        absolute (from the start of the file).

    Raises:
        ValueError: the file is truncated or its header is malformed.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(_truncated(path, size, "no header"))
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER):
            raise ValueError(
                _truncated(path, size, f"header of {length} bytes")
            )
        try:
            header = json.loads(f.read(length))
        except (
            UnicodeDecodeError,
            json.JSONDecodeError,
            RecursionError,
        ) as err:
            raise ValueError(
                f"'{path}' is not a safetensors file: its header is not "
                f"JSON ({err})."
            ) from None
    if not isinstance(header, dict):
        raise ValueError(f"'{path}': the safetensors header is not an object.")
    header.pop("__metadata__", None)
    data = size - 8 - length
    for name, info in header.items():
        _check_entry(path, name, info, data, size)
        start, end = info["data_offsets"]
        info["data_offsets"] = (8 + length + start, 8 + length + end)
    return header


def read_tensor(path, header, name):
    """Reads one tensor of a checked safetensors file (`check_safetensors`
    gives `header`) with a plain read: unlike a memory map, nothing of the
    file stays resident once the tensor is dropped.

    Raises:
        KeyError: the file has no tensor `name`.
    """
    if name not in header:
        raise KeyError(f"'{path}' does not contain tensor '{name}'")
    info = header[name]
    dtype = _numpy_dtype(path, name, info["dtype"])
    start, end = info["data_offsets"]
    value = np.empty(tuple(int(d) for d in info["shape"]), dtype)
    with open(path, "rb") as f:
        f.seek(start)
        if f.readinto(memoryview(value.reshape(-1).view(np.uint8))) != (
            end - start
        ):
            raise ValueError(_truncated(path, os.path.getsize(path), name))
    return value


def _numpy_dtype(path, name, code):
    if code == "BF16":
        return ml_dtypes.bfloat16
    numpy_name = {
        "F64": "float64", "F32": "float32", "F16": "float16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U8": "uint8", "BOOL": "bool",
    }.get(code)  # fmt: skip
    if numpy_name is None:
        raise ValueError(
            f"'{path}': tensor '{name}' has dtype {code}, which keras_qlora "
            "cannot read."
        )
    return np.dtype(numpy_name)


def _check_entry(path, name, info, data, size):
    try:
        start, end = (int(x) for x in info["data_offsets"])
        count = 1
        for dim in info["shape"]:
            count *= int(dim)
        itemsize = _SAFETENSORS_ITEMSIZE.get(info["dtype"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"'{path}': tensor '{name}' has a malformed header entry {info!r}."
        ) from None
    if end > data:
        raise ValueError(
            _truncated(path, size, f"tensor '{name}' ends at byte {end}")
        )
    if itemsize is not None and end - start != count * itemsize:
        raise ValueError(
            f"'{path}': tensor '{name}' ({info['dtype']}, shape "
            f"{info['shape']}) needs {count * itemsize} bytes; the header "
            f"gives it {end - start}."
        )


def check_h5(path):
    """Opens an HDF5 weights file to check it is complete.

    Raises:
        ValueError: h5py cannot open it (truncated, not HDF5).
    """
    import h5py

    try:
        with h5py.File(path, "r"):
            pass
    except OSError as err:
        raise ValueError(
            f"'{path}' cannot be read as an HDF5 weights file "
            f"({os.path.getsize(path)} bytes): {err}. Is it truncated?"
        ) from None


def _read_json(preset, name):
    path = _join(preset, name)
    if not os.path.isfile(path):
        raise ValueError(
            f"Preset directory '{preset}' has no {name}. The directory "
            f"holds: {_listing(preset)}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"'{path}' is not valid JSON: {err}") from None


def _truncated(path, size, what):
    return (
        f"'{path}' is truncated or not a safetensors file: {what}, but the "
        f"file has {size} bytes."
    )


def _no_weights(preset, names):
    return (
        f"Preset directory '{preset}' has no weights: expected "
        f"{' or '.join(names)}. The directory holds: {_listing(preset)}"
    )


def _exists(preset, name):
    return os.path.isfile(_join(preset, name))


def _join(preset, name):
    return os.path.join(preset, name)


def _listing(preset):
    names = sorted(os.listdir(preset))
    return (
        ", ".join(names[:30]) + (" ..." if len(names) > 30 else "") or "(empty)"
    )
