"""Catalog cases (see catalog.py): `.keras` files and SavedModels,
`model.save` / `load_model(.keras)` and `export` / `load_saved_model`.

Truncated, edited and mismatched files, and failed writes that must leave
the previous good files byte-identical (`files_kept`).
"""

import functools
import json
import os
import shutil
import zipfile

import numpy as np

from ._files_support import _kept_file
from ._files_support import _lora
from ._files_support import _model
from ._files_support import _poison
from ._files_support import _randomize
from ._files_support import _write_file
from .catalog import Case
from .catalog import Correct
from .catalog import Refused
from .catalog import files_kept

# -- .keras files -------------------------------------------------------------


@functools.cache
def _keras_bytes():
    import tempfile

    model = _model()
    _randomize(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        model.save(path)
        with open(path, "rb") as f:
            return f.read()


def _keras_file(tmp, edit_config=None, edit_weights=None):
    """A good `.keras` file at tmp/m.keras, its config / weights edited."""
    import h5py

    path = tmp / "m.keras"
    path.write_bytes(_keras_bytes())
    if not (edit_config or edit_weights):
        return path
    work = tmp / "unzipped"
    with zipfile.ZipFile(path) as z:
        z.extractall(work)
    if edit_config:
        config = json.loads((work / "config.json").read_text())
        edit_config(config["config"])
        (work / "config.json").write_text(json.dumps(config))
    if edit_weights:
        with h5py.File(work / "model.weights.h5", "r+") as f:
            edit_weights(f)
    with zipfile.ZipFile(path, "w") as z:
        for name in os.listdir(work):
            z.write(work / name, name)
    shutil.rmtree(work)
    return path


def _load_keras(path):
    import keras

    return keras.saving.load_model(path)


def _h5_key(f, suffix):
    """The dataset of the `.keras` weights whose path ends in `suffix`."""
    found = []
    f.visititems(
        lambda name, obj: found.append(name) if name.endswith(suffix) else None
    )
    return found[0]


def _h5_set(suffix, make):
    def edit(f):
        key = _h5_key(f, suffix)
        value = make(f[key][...])
        del f[key]
        f[key] = value

    return edit


def _h5_drop(suffix):
    def edit(f):
        del f[_h5_key(f, suffix)]

    return edit


def _keras_kept(tmp, call, prepare=None):
    """A good tmp/m.keras, then `call(model, path)` in `files_kept(tmp)`."""
    path = _keras_file(tmp)
    model = _model()
    if prepare:
        prepare(model)
    with files_kept(tmp):
        call(model, path)


def _save_keras_twice(tmp):
    model = _model()
    _randomize(model)
    path = tmp / "m.keras"
    model.save(path)
    model.save(path)
    assert os.listdir(tmp) == ["m.keras"], os.listdir(tmp)
    loaded = _load_keras(path)
    np.testing.assert_array_equal(
        _lora(loaded).lora_b.numpy(), _lora(model).lora_b.numpy()
    )


def _settings(key, value):
    return lambda config: config["settings"].update({key: value})


KERAS_CASES = [
    Case(
        "load_model(.keras)",
        "missing file",
        lambda tmp: _load_keras(tmp / "none.keras"),
        Refused(ValueError, r"not found", names=("{tmp}/none.keras",)),
    ),
    Case(
        "load_model(.keras)",
        "empty file",
        lambda tmp: _load_keras(_write_file(tmp, "m.keras", b"")),
        Refused(ValueError, r"\.keras.*file", names=("{tmp}/m.keras",)),
    ),
    Case(
        "load_model(.keras)",
        "not a zip",
        lambda tmp: _load_keras(_write_file(tmp, "m.keras", b"hello")),
        Refused(ValueError, r"\.keras.*file", names=("{tmp}/m.keras",)),
    ),
    Case(
        "load_model(.keras)",
        "truncated",
        lambda tmp: _load_keras(
            _write_file(tmp, "m.keras", _keras_bytes()[:2000])
        ),
        Refused(ValueError, r"\.keras.*file", names=("{tmp}/m.keras",)),
    ),
    Case(
        "load_model(.keras)",
        "edited alpha",
        lambda tmp: _load_keras(_keras_file(tmp, _settings("alpha", 32.0))),
        Refused(
            ValueError, r"lora_alpha: layer 4.0, model 32.0", names=("query",)
        ),
    ),
    Case(
        "load_model(.keras)",
        "edited rank",
        lambda tmp: _load_keras(_keras_file(tmp, _settings("rank", 3))),
        Refused(ValueError, r"rank", names=("query",)),
    ),
    Case(
        "load_model(.keras)",
        "edited block_size 48",
        lambda tmp: _load_keras(_keras_file(tmp, _settings("block_size", 48))),
        Refused(ValueError, r"block_size", names=("48",)),
    ),
    Case(
        "load_model(.keras)",
        "a replaced path the model lacks",
        lambda tmp: _load_keras(
            _keras_file(tmp, lambda c: c["replaced"][0].update(path="nowhere"))
        ),
        Refused(
            ValueError, r"rebuilt base model does not have", names=("nowhere",)
        ),
    ),
    Case(
        "load_model(.keras)",
        "NaN lora_b",
        lambda tmp: _load_keras(
            _keras_file(
                tmp, edit_weights=_h5_set("lora_b", lambda v: v * np.nan)
            )
        ),
        Refused(ValueError, r"'lora_b' holds NaN", names=("query",)),
    ),
    Case(
        "load_model(.keras)",
        "lora_b missing",
        lambda tmp: _load_keras(
            _keras_file(tmp, edit_weights=_h5_drop("lora_b"))
        ),
        Refused(ValueError, r"lora_b", names=("query",)),
    ),
    Case(
        "load_model(.keras)",
        "lora_a of the wrong shape",
        lambda tmp: _load_keras(
            _keras_file(tmp, edit_weights=_h5_set("lora_a", lambda v: v.T))
        ),
        Refused(ValueError, r"lora_a", names=("query",)),
    ),
    Case(
        "load_model(.keras)",
        "NF4 bytes truncated",
        lambda tmp: _load_keras(
            _keras_file(
                tmp, edit_weights=_h5_set("nf4_packed", lambda v: v[:3])
            )
        ),
        Refused(ValueError, r"nf4_packed"),
    ),
    Case(
        "model.save",
        "NaN weights over a good file",
        lambda tmp: _keras_kept(tmp, lambda m, p: m.save(p), _poison),
        Refused(ValueError, r"NaN or Inf", names=("lora_b", "{tmp}/m.keras")),
    ),
    Case(
        "model.save",
        "overwrite=False on an existing file",
        lambda tmp: _keras_kept(tmp, lambda m, p: m.save(p, overwrite=False)),
        Refused(FileExistsError, r"overwrite=True", names=("{tmp}/m.keras",)),
    ),
    Case(
        "model.save",
        "a .txt path",
        lambda tmp: _keras_kept(tmp, lambda m, p: m.save(tmp / "m.txt")),
        Refused(ValueError, r"\.keras", names=("m.txt",)),
    ),
    Case(
        "model.save",
        "a file in the path",
        lambda tmp: _keras_kept(tmp, lambda m, p: m.save(p / "x.keras")),
        Refused(NotADirectoryError, r"is a file", names=("{tmp}/m.keras",)),
    ),
    Case("model.save", "saved twice", _save_keras_twice, Correct()),
]


# -- SavedModel ---------------------------------------------------------------


@functools.cache
def _saved_model_files():
    """`{relative path: bytes}` of a portable SavedModel of `_model()`."""
    import tempfile

    import keras_qlora

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sm")
        keras_qlora.export(_model(), path, portable=True)
        return {
            os.path.relpath(os.path.join(root, name), path): open(
                os.path.join(root, name), "rb"
            ).read()
            for root, _, names in os.walk(path)
            for name in names
        }


def _saved_model(tmp, edit=None):
    path = tmp / "sm"
    for rel, data in _saved_model_files().items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    if edit:
        edit(path)
    return path


def _load_sm(path):
    import keras_qlora

    return keras_qlora.load_saved_model(path)


def _export(model, path, **kw):
    import keras_qlora

    return keras_qlora.export(model, path, **kw)


def _export_kept(tmp, call, prepare=None):
    path = _saved_model(tmp)
    model = _model()
    if prepare:
        prepare(model)
    with files_kept(tmp):
        call(model, path)


def _variables_data(edit):
    def apply(path):
        folder = path / "variables"
        for name in os.listdir(folder):
            if "data" in name:
                data = (folder / name).read_bytes()
                (folder / name).write_bytes(edit(data))

    return apply


def _pb(data):
    return lambda path: (path / "saved_model.pb").write_bytes(data)


SAVED_MODEL_CASES = [
    Case(
        "load_saved_model",
        "missing folder",
        lambda tmp: _load_sm(tmp / "none"),
        Refused(
            FileNotFoundError,
            r"saved_model.pb is missing",
            names=("{tmp}/none",),
        ),
    ),
    Case(
        "load_saved_model",
        "path is a file",
        lambda tmp: _load_sm(_write_file(tmp, "sm")),
        Refused(
            FileNotFoundError, r"saved_model.pb is missing", names=("{tmp}/sm",)
        ),
    ),
    Case(
        "load_saved_model",
        "saved_model.pb truncated",
        lambda tmp: _load_sm(
            _saved_model(
                tmp, lambda p: _pb((p / "saved_model.pb").read_bytes()[:999])(p)
            )
        ),
        Refused(
            ValueError, r"not a readable SavedModel", names=("saved_model.pb",)
        ),
        isolate=True,
    ),
    Case(
        "load_saved_model",
        "saved_model.pb empty",
        lambda tmp: _load_sm(_saved_model(tmp, _pb(b""))),
        Refused(ValueError, r"SavedModel", names=("{tmp}/sm",)),
        isolate=True,
    ),
    Case(
        "load_saved_model",
        "saved_model.pb garbage",
        lambda tmp: _load_sm(_saved_model(tmp, _pb(os.urandom(5000)))),
        Refused(ValueError, r"SavedModel", names=("{tmp}/sm",)),
        isolate=True,
    ),
    Case(
        "load_saved_model",
        "variables truncated",
        lambda tmp: _load_sm(
            _saved_model(tmp, _variables_data(lambda d: d[:10]))
        ),
        Refused(
            ValueError, r"SavedModel at .*TensorFlow said", names=("{tmp}/sm",)
        ),
        isolate=True,
    ),
    Case(
        "load_saved_model",
        "variables overwritten with garbage",
        lambda tmp: _load_sm(
            _saved_model(tmp, _variables_data(lambda d: os.urandom(len(d))))
        ),
        Refused(
            ValueError, r"SavedModel at .*TensorFlow said", names=("{tmp}/sm",)
        ),
        isolate=True,
    ),
    Case(
        "load_saved_model",
        "variables folder missing",
        lambda tmp: _load_sm(
            _saved_model(tmp, lambda p: shutil.rmtree(p / "variables"))
        ),
        Refused(
            ValueError, r"SavedModel at .*TensorFlow said", names=("{tmp}/sm",)
        ),
        isolate=True,
    ),
    Case(
        "export",
        "a plain object",
        lambda tmp: _export(object(), tmp / "sm"),
        Refused(TypeError, r"expects a keras.Model", names=("object",)),
    ),
    Case(
        "export",
        "existing SavedModel, overwrite=False",
        lambda tmp: _export_kept(tmp, lambda m, p: _export(m, p)),
        Refused(FileExistsError, r"overwrite=True", names=("{tmp}/sm",)),
    ),
    Case(
        "export",
        "overwrite='yes' (not a bool)",
        lambda tmp: _export_kept(
            tmp, lambda m, p: _export(m, p, overwrite="yes")
        ),
        Refused(TypeError, r"overwrite must be a bool", names=("overwrite",)),
    ),
    Case(
        "export",
        "NaN adapter over a good SavedModel",
        lambda tmp: _export_kept(
            tmp, lambda m, p: _export(m, p, overwrite=True), _poison
        ),
        Refused(ValueError, r"NaN or Inf", names=("lora_b", "{tmp}/sm")),
    ),
    Case(
        "export",
        "path is a file, overwrite=True",
        lambda tmp: _kept_file(
            tmp, lambda p: _export(_model(), p, overwrite=True)
        ),
        Refused(ValueError, r"not a SavedModel directory", names=("{tmp}",)),
    ),
    Case(
        "export",
        "a file in the path",
        lambda tmp: _kept_file(tmp, lambda p: _export(_model(), p / "sm")),
        Refused(NotADirectoryError, r"is a file", names=("{tmp}/adapter",)),
    ),
]


CASES = KERAS_CASES + SAVED_MODEL_CASES
