"""Catalog cases (see catalog.py): adapter files, `save_adapter` /
`load_adapter`.

Bad configs and tensors, wrong shapes, dtypes and values, lying
safetensors headers, and failed writes that must leave the previous good
files byte-identical (`files_kept`). Models are one or two small Dense
layers, seeded, so that an adapter written by one case's model fits
another's.
"""

import os
import struct

import numpy as np

from ._files_support import ADAPTER_CFG
from ._files_support import ADAPTER_W
from ._files_support import _edit_config
from ._files_support import _edit_tensors
from ._files_support import _fill
from ._files_support import _float_model
from ._files_support import _kept_file
from ._files_support import _lora
from ._files_support import _model
from ._files_support import _poison
from ._files_support import _randomize
from ._files_support import _raw_safetensors
from ._files_support import _refused_unchanged
from ._files_support import _set_weights
from ._files_support import _setf
from ._files_support import _write_file
from .catalog import Case
from .catalog import Correct
from .catalog import Refused
from .catalog import files_kept

# -- adapter files ------------------------------------------------------------


def _adapter(tmp, model=None, name="adapter"):
    import keras_qlora

    model = model or _model()
    _randomize(model)
    path = tmp / name
    keras_qlora.save_adapter(model, path)
    return model, path


def _load(tmp, edit=None, model=None, **kw):
    """Writes a good adapter, edits it, loads it into a fresh model that
    must stay unchanged."""
    import keras_qlora

    _, path = _adapter(tmp)
    if edit:
        edit(path)
    model = model or _model(**kw)
    _refused_unchanged(lambda: keras_qlora.load_adapter(model, path), model)


def _save_kept(tmp, call, prepare=None):
    """A good adapter at tmp/adapter, then `call(model, path)` inside
    `files_kept(tmp)`."""
    model, path = _adapter(tmp)
    if prepare:
        prepare(model)
    with files_kept(tmp):
        call(model, path)


def _save(model, path, **kw):
    import keras_qlora

    return keras_qlora.save_adapter(model, path, **kw)


def _nan_16(tensors):
    tensors["query/lora_b"] = tensors["query/lora_b"].astype("float16")
    tensors["query/lora_a"] = tensors["query/lora_a"].astype("float16")


def _float16_loads(tmp):
    import keras_qlora

    model, path = _adapter(tmp)
    _edit_tensors(path, _nan_16)
    fresh = _model()
    keras_qlora.load_adapter(fresh, path)
    want = _lora(model).lora_b.numpy().astype("float16").astype("float32")
    np.testing.assert_array_equal(_lora(fresh).lora_b.numpy(), want)


def _bfloat16_loads(tmp):
    import keras_qlora

    model, path = _adapter(tmp)
    b = _lora(model).lora_b.numpy()
    a = _lora(model).lora_a.numpy()
    head = {"__metadata__": {"format": "keras_qlora.adapter"}}
    body, offset = b"", 0
    for key, value in (("query/lora_a", a), ("query/lora_b", b)):
        # bfloat16: the top 16 bits of the float32.
        raw = (value.view(np.uint32) >> 16).astype("<u2").tobytes()
        head[key] = {
            "dtype": "BF16",
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        body, offset = body + raw, offset + len(raw)
    _set_weights(path, _raw_safetensors(head, body))
    fresh = _model()
    keras_qlora.load_adapter(fresh, path)
    want = ((b.view(np.uint32) >> 16) << 16).view(np.float32)
    np.testing.assert_array_equal(_lora(fresh).lora_b.numpy(), want)


def _save_twice(tmp):
    import keras_qlora

    model, path = _adapter(tmp)
    _randomize(model)
    keras_qlora.save_adapter(model, path, overwrite=True)
    keras_qlora.save_adapter(model, path, overwrite=True)
    assert sorted(os.listdir(tmp)) == ["adapter"], os.listdir(tmp)
    fresh = _model()
    keras_qlora.load_adapter(fresh, path)
    np.testing.assert_array_equal(
        _lora(fresh).lora_b.numpy(), _lora(model).lora_b.numpy()
    )


ADAPTER_CASES = [
    Case(
        "save_adapter",
        "a plain Keras model",
        lambda tmp: _save(_float_model(), tmp / "a"),
        Refused(TypeError, r"expects the model returned by .*apply"),
    ),
    Case(
        "save_adapter",
        "a model without LoRA layers",
        lambda tmp: _save(_model(targets=None), tmp / "a"),
        Refused(ValueError, r"has no LoRA layers"),
    ),
    Case(
        "save_adapter",
        "existing adapter, overwrite=False",
        lambda tmp: _save_kept(tmp, lambda m, p: _save(m, p)),
        Refused(FileExistsError, r"overwrite=True", names=("{tmp}/adapter",)),
    ),
    Case(
        "save_adapter",
        "overwrite='no' (not a bool)",
        lambda tmp: _save_kept(tmp, lambda m, p: _save(m, p, overwrite="no")),
        Refused(TypeError, r"overwrite must be a bool", names=("overwrite",)),
    ),
    Case(
        "save_adapter",
        "NaN weights over a good adapter",
        lambda tmp: _save_kept(
            tmp, lambda m, p: _save(m, p, overwrite=True), _poison
        ),
        Refused(ValueError, r"NaN or Inf.*diverged", names=("query/lora_b",)),
    ),
    Case(
        "save_adapter",
        "Inf in a modules_to_save kernel",
        lambda tmp: _save_inf_module(tmp),
        Refused(ValueError, r"NaN or Inf", names=("head/kernel",)),
    ),
    Case(
        "save_adapter",
        "overwrite=True on an unrelated folder",
        lambda tmp: _save_over_folder(tmp),
        Refused(ValueError, r"is not an adapter directory", names=("{tmp}",)),
    ),
    Case(
        "save_adapter",
        "path is a file, overwrite=True",
        lambda tmp: _kept_file(
            tmp, lambda p: _save(_model(), p, overwrite=True)
        ),
        Refused(ValueError, r"not an adapter directory", names=("{tmp}",)),
    ),
    Case(
        "save_adapter",
        "a file in the path",
        lambda tmp: _kept_file(tmp, lambda p: _save(_model(), p / "sub")),
        Refused(NotADirectoryError, r"is a file", names=("{tmp}/adapter",)),
    ),
    Case(
        "save_adapter",
        "unknown adapter name",
        lambda tmp: _save(_model(), tmp / "a", name="other"),
        Refused(ValueError, r"no adapter named 'other'", names=("default",)),
    ),
    Case(
        "save_adapter",
        "adapter name of the wrong type",
        lambda tmp: _save(_model(), tmp / "a", name=3),
        Refused(TypeError, r"adapter name must be a string", names=("3",)),
    ),
    Case(
        "save_adapter",
        "saved twice with overwrite=True",
        _save_twice,
        Correct(),
    ),
    Case(
        "load_adapter",
        "a plain Keras model",
        lambda tmp: _load_into(tmp, _float_model()),
        Refused(TypeError, r"expects the model returned by .*apply"),
    ),
    Case(
        "load_adapter",
        "missing folder",
        lambda tmp: _load_path(_model(), tmp / "nowhere"),
        Refused(FileNotFoundError, r"No adapter", names=("{tmp}/nowhere",)),
    ),
    Case(
        "load_adapter",
        "path is a file",
        lambda tmp: _load_path(_model(), _write_file(tmp)),
        Refused(FileNotFoundError, r"No adapter", names=("{tmp}/adapter",)),
    ),
    Case(
        "load_adapter",
        "missing adapter_config.json",
        lambda tmp: _load(tmp, lambda p: (p / ADAPTER_CFG).unlink()),
        Refused(FileNotFoundError, r"missing", names=(ADAPTER_CFG,)),
    ),
    Case(
        "load_adapter",
        "missing weights file",
        lambda tmp: _load(tmp, lambda p: (p / ADAPTER_W).unlink()),
        Refused(FileNotFoundError, r"missing", names=(ADAPTER_W,)),
    ),
    Case(
        "load_adapter",
        "empty config",
        lambda tmp: _load(tmp, lambda p: (p / ADAPTER_CFG).write_bytes(b"")),
        Refused(ValueError, r"is not valid JSON", names=(ADAPTER_CFG,)),
    ),
    Case(
        "load_adapter",
        "config is not UTF-8",
        lambda tmp: _load(
            tmp, lambda p: (p / ADAPTER_CFG).write_bytes(b"\xff")
        ),
        Refused(ValueError, r"is not valid JSON", names=(ADAPTER_CFG,)),
    ),
    Case(
        "load_adapter",
        "config nested 100000 deep",
        lambda tmp: _load(
            tmp,
            lambda p: (p / ADAPTER_CFG).write_bytes(
                b"[" * 100_000 + b"]" * 100_000
            ),
        ),
        Refused(ValueError, r"is not valid JSON", names=(ADAPTER_CFG,)),
    ),
    Case(
        "load_adapter",
        "config is a JSON list",
        lambda tmp: _load(tmp, lambda p: (p / ADAPTER_CFG).write_text("[1]")),
        Refused(ValueError, r"must be a JSON object", names=(ADAPTER_CFG,)),
    ),
    Case(
        "load_adapter",
        "config rank is a string",
        lambda tmp: _load(tmp, lambda p: _edit_config(p, _setf("rank", "2"))),
        Refused(ValueError, r"'rank' must be an int", names=(ADAPTER_CFG,)),
    ),
    Case(
        "load_adapter",
        "config rank is true",
        lambda tmp: _load(tmp, lambda p: _edit_config(p, _setf("rank", True))),
        Refused(ValueError, r"'rank' must be an int", names=(ADAPTER_CFG,)),
    ),
    Case(
        "load_adapter",
        "config without nf4.block_size",
        lambda tmp: _load(
            tmp, lambda p: _edit_config(p, lambda c: c["nf4"].pop("block_size"))
        ),
        Refused(ValueError, r"no field 'nf4.block_size'", names=(ADAPTER_CFG,)),
    ),
    Case(
        "load_adapter",
        "config base_model.layers not strings",
        lambda tmp: _load(
            tmp,
            lambda p: _edit_config(
                p, lambda c: c["base_model"].update(layers={"query": 1})
            ),
        ),
        Refused(ValueError, r"an object of strings", names=("base_model",)),
    ),
    Case(
        "load_adapter",
        "another format",
        lambda tmp: _load(tmp, lambda p: _edit_config(p, _setf("format", "x"))),
        Refused(ValueError, r"not a keras_qlora adapter", names=("format",)),
    ),
    Case(
        "load_adapter",
        "a newer format_version",
        lambda tmp: _load(
            tmp, lambda p: _edit_config(p, _setf("format_version", 99))
        ),
        Refused(ValueError, r"format_version=99", names=(ADAPTER_CFG,)),
    ),
    Case(
        "load_adapter",
        "rank mismatch",
        lambda tmp: _load(tmp, rank=4),
        Refused(ValueError, r"does not fit.*rank: adapter 2, model 4"),
    ),
    Case(
        "load_adapter",
        "alpha mismatch",
        lambda tmp: _load(tmp, alpha=8),
        Refused(ValueError, r"does not fit.*alpha: adapter 4.0, model 8.0"),
    ),
    Case(
        "load_adapter",
        "block_size mismatch",
        lambda tmp: _load(tmp, block_size=32),
        Refused(ValueError, r"block_size: adapter 64, model 32"),
    ),
    Case(
        "load_adapter",
        "different target layers",
        lambda tmp: _load(tmp, targets=("query", "head")),
        Refused(ValueError, r"target_paths: only in the adapter \[\], only "),
    ),
    Case(
        "load_adapter",
        "another base model",
        lambda tmp: _load(tmp, seed=1),
        Refused(ValueError, r"different base model.*query", names=("{tmp}",)),
    ),
    Case(
        "load_adapter",
        "weights truncated, checksum kept",
        lambda tmp: _load(tmp, _truncate_weights),
        Refused(ValueError, r"does not match the checksum", names=(ADAPTER_W,)),
    ),
    Case(
        "load_adapter",
        "weights truncated, checksum updated",
        lambda tmp: _load(
            tmp, lambda p: _set_weights(p, (p / ADAPTER_W).read_bytes()[:50])
        ),
        Refused(ValueError, r"not a readable safetensors", names=(ADAPTER_W,)),
    ),
    Case(
        "load_adapter",
        "empty weights file",
        lambda tmp: _load(tmp, lambda p: _set_weights(p, b"")),
        Refused(ValueError, r"not a readable safetensors", names=(ADAPTER_W,)),
    ),
    Case(
        "load_adapter",
        "garbage weights file",
        lambda tmp: _load(tmp, lambda p: _set_weights(p, os.urandom(4096))),
        Refused(ValueError, r"not a readable safetensors", names=(ADAPTER_W,)),
        isolate=True,
    ),
    Case(
        "load_adapter",
        "safetensors offsets beyond the data",
        lambda tmp: _load(tmp, _lying_offsets),
        Refused(ValueError, r"not a readable safetensors", names=(ADAPTER_W,)),
        isolate=True,
    ),
    Case(
        "load_adapter",
        "safetensors header length 2**63",
        lambda tmp: _load(
            tmp, lambda p: _set_weights(p, struct.pack("<Q", 2**63) + b"{}")
        ),
        Refused(ValueError, r"not a readable safetensors", names=(ADAPTER_W,)),
        isolate=True,
    ),
    Case(
        "load_adapter",
        "a tensor of unsupported dtype (BOOL)",
        lambda tmp: _load(tmp, _bool_tensor),
        Refused(ValueError, r"dtype", names=(ADAPTER_W, "query/lora_a")),
    ),
    Case(
        "load_adapter",
        "lora_a of the wrong shape",
        lambda tmp: _load(tmp, _tensors(_reshape_a)),
        Refused(ValueError, r"has shape \(2, 16\)", names=("query/lora_a",)),
    ),
    Case(
        "load_adapter",
        "int32 lora_b",
        lambda tmp: _load(tmp, _tensors(_astype("query/lora_b", "int32"))),
        Refused(ValueError, r"has dtype int32", names=("query/lora_b",)),
    ),
    Case(
        "load_adapter",
        "NaN in lora_b",
        lambda tmp: _load(tmp, _tensors(_fill("query/lora_b", np.nan))),
        Refused(ValueError, r"holds NaN or Inf", names=("query/lora_b",)),
    ),
    Case(
        "load_adapter",
        "float64 1e300 (Inf as float32)",
        lambda tmp: _load(tmp, _tensors(_fill("query/lora_a", 1e300, "f8"))),
        Refused(ValueError, r"holds NaN or Inf", names=("query/lora_a",)),
    ),
    Case(
        "load_adapter",
        "a tensor missing",
        lambda tmp: _load(tmp, _tensors(lambda t: t.pop("query/lora_b"))),
        Refused(ValueError, r"missing keys \['query/lora_b'\]"),
    ),
    Case(
        "load_adapter",
        "an extra tensor",
        lambda tmp: _load(
            tmp, _tensors(lambda t: t.update(extra=np.zeros(2, "f4")))
        ),
        Refused(ValueError, r"unknown keys \['extra'\]", names=(ADAPTER_W,)),
    ),
    Case(
        "load_adapter",
        "adapter name with a space",
        lambda tmp: _load_into(tmp, _model(), name="my adapter"),
        Refused(ValueError, r"adapter name must be", names=("my adapter",)),
    ),
    Case("load_adapter", "float16 tensors", _float16_loads, Correct()),
    Case("load_adapter", "bfloat16 tensors", _bfloat16_loads, Correct()),
]


def _tensors(edit):
    return lambda path: _edit_tensors(path, edit)


def _reshape_a(tensors):
    tensors["query/lora_a"] = np.ascontiguousarray(tensors["query/lora_a"].T)


def _astype(key, dtype):
    def edit(tensors):
        tensors[key] = tensors[key].astype(dtype)

    return edit


def _truncate_weights(path):
    data = (path / ADAPTER_W).read_bytes()
    (path / ADAPTER_W).write_bytes(data[: len(data) // 2])


def _lying_offsets(path):
    head = {
        "query/lora_a": {
            "dtype": "F32",
            "shape": [16, 2],
            "data_offsets": [0, 128],
        },
        "query/lora_b": {
            "dtype": "F32",
            "shape": [2, 8],
            "data_offsets": [128, 1 << 40],
        },
    }
    _set_weights(path, _raw_safetensors(head, bytes(192)))


def _bool_tensor(path):
    head = {
        "query/lora_a": {
            "dtype": "BOOL",
            "shape": [16, 2],
            "data_offsets": [0, 32],
        },
        "query/lora_b": {
            "dtype": "F32",
            "shape": [2, 8],
            "data_offsets": [32, 96],
        },
    }
    _set_weights(path, _raw_safetensors(head, bytes(96)))


def _load_path(model, path):
    import keras_qlora

    keras_qlora.load_adapter(model, path)


def _load_into(tmp, model, **kw):
    import keras_qlora

    _, path = _adapter(tmp)
    keras_qlora.load_adapter(model, path, **kw)


def _save_inf_module(tmp):
    import keras_qlora

    model = _model(modules_to_save=["head"])
    path = tmp / "adapter"
    keras_qlora.save_adapter(model, path)
    head = model.base_model.get_layer("head")
    kernel = head.kernel.numpy()
    kernel[0, 0] = np.inf
    head.kernel.assign(kernel)
    with files_kept(tmp):
        keras_qlora.save_adapter(model, path, overwrite=True)


def _save_over_folder(tmp):
    (tmp / "notes.txt").write_text("mine")
    with files_kept(tmp):
        _save(_model(), tmp, overwrite=True)


CASES = ADAPTER_CASES
