"""Catalog cases (see catalog.py): every file reader and writer.

Adapters (`save_adapter` / `load_adapter`), PEFT adapters, bitsandbytes
state dicts, `.keras` files, SavedModels and training checkpoints. Each
writer has at least one failed write that must leave the previous good
files byte-identical (`files_kept`). Models are one or two small Dense
layers, seeded, so that an adapter written by one case's model fits
another's.
"""

import functools
import hashlib
import json
import math
import os
import shutil
import struct
import zipfile

import numpy as np

from .catalog import Case
from .catalog import Correct
from .catalog import Refused
from .catalog import files_kept

ADAPTER_CFG = "adapter_config.json"
ADAPTER_W = "adapter_model.safetensors"


# -- models -------------------------------------------------------------------


def _float_model(seed=0, head=True):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16,), name="x")
    out = keras.layers.Dense(8, name="query")(inputs)
    if head:
        out = keras.layers.Dense(4, name="head")(out)
    return keras.Model(inputs, out)


def _model(seed=0, rank=2, alpha=4, targets=("query",), **kwargs):
    import keras_qlora

    kwargs.setdefault("verbose", False)
    return keras_qlora.apply(
        _float_model(seed),
        rank=rank,
        alpha=alpha,
        target_modules=list(targets) if targets else None,
        **kwargs,
    )


def _compiled(**kwargs):
    model = _model(**kwargs)
    model.compile(optimizer="adam", loss="mse")
    return model


def _lora(model, path="query"):
    return model.qlora_layers(lora_only=True)[path]


def _poison(model, value=np.nan):
    layer = _lora(model)
    b = layer.lora_b.numpy()
    b[0, 0] = value
    layer.lora_b.assign(b)


def _randomize(model):
    layer = _lora(model)
    rng = np.random.default_rng(1)
    layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("f4"))


def _values(model):
    return [v.numpy().copy() for v in model.weights]


def _unchanged(model, before):
    for got, want in zip(_values(model), before, strict=True):
        np.testing.assert_array_equal(got, want)


def _refused_unchanged(call, model):
    """Runs `call()` (which must raise); re-raises after asserting that
    `model`'s weights did not change."""
    before = _values(model)
    try:
        call()
    finally:
        _unchanged(model, before)


# -- adapter files ------------------------------------------------------------


def _adapter(tmp, model=None, name="adapter"):
    import keras_qlora

    model = model or _model()
    _randomize(model)
    path = tmp / name
    keras_qlora.save_adapter(model, path)
    return model, path


def _edit_config(path, edit):
    config = json.loads((path / ADAPTER_CFG).read_text())
    edit(config)
    (path / ADAPTER_CFG).write_text(json.dumps(config))


def _set_weights(path, data):
    """Replaces the weights file by `data`, checksum updated, so that the
    reader's own checks (not the checksum) see it."""
    (path / ADAPTER_W).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    _edit_config(path, lambda c: c.update(weights_sha256=digest))


def _edit_tensors(path, edit):
    import safetensors.numpy

    tensors = safetensors.numpy.load((path / ADAPTER_W).read_bytes())
    edit(tensors)
    _set_weights(path, safetensors.numpy.save(tensors))


def _raw_safetensors(header, body=b""):
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + body


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


def _write_file(tmp, name="adapter", data=b"not a folder"):
    (tmp / name).write_bytes(data)
    return tmp / name


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


def _setf(key, value):
    return lambda config: config.update({key: value})


def _tensors(edit):
    return lambda path: _edit_tensors(path, edit)


def _reshape_a(tensors):
    tensors["query/lora_a"] = np.ascontiguousarray(tensors["query/lora_a"].T)


def _astype(key, dtype):
    def edit(tensors):
        tensors[key] = tensors[key].astype(dtype)

    return edit


def _fill(key, value, dtype="f4"):
    def edit(tensors):
        tensors[key] = np.full(tensors[key].shape, value, dtype)

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


def _kept_file(tmp, call):
    path = _write_file(tmp)
    with files_kept(tmp):
        call(path)


# -- PEFT adapters ------------------------------------------------------------

PEFT_A = "base_model.model.query.lora_A.weight"
PEFT_B = "base_model.model.query.lora_B.weight"


def _peft(tmp, model=None):
    from keras_qlora.interop import save_peft_adapter

    model = model or _model()
    _randomize(model)
    path = tmp / "peft"
    save_peft_adapter(model, path, naming=None)
    return model, path


def _peft_config(edit):
    return lambda path: _edit_config(path, edit)


def _peft_tensors(edit):
    def apply(path):
        import safetensors.numpy

        tensors = safetensors.numpy.load((path / ADAPTER_W).read_bytes())
        edit(tensors)
        (path / ADAPTER_W).write_bytes(safetensors.numpy.save(tensors))

    return apply


def _peft_load(tmp, edit=None, naming=None, **kw):
    from keras_qlora.interop import load_peft_adapter

    _, path = _peft(tmp)
    if edit:
        edit(path)
    model = _model(**kw)
    _refused_unchanged(
        lambda: load_peft_adapter(model, path, naming=naming), model
    )


def _peft_save_kept(tmp, prepare=None, **kw):
    from keras_qlora.interop import save_peft_adapter

    model, path = _peft(tmp)
    if prepare:
        prepare(model)
    with files_kept(tmp):
        save_peft_adapter(model, path, naming=None, **kw)


def _peft_apply(tmp, edit=None, **kw):
    """apply_peft_adapter on a float model, which a refusal leaves as it
    was (still float, same weights)."""
    import keras

    from keras_qlora.interop import apply_peft_adapter

    _, path = _peft(tmp)
    if edit:
        edit(path)
    model = _float_model()
    before = _values(model)
    try:
        apply_peft_adapter(model, path, naming=None, **kw)
    finally:
        kinds = {type(layer) for layer in model.layers[1:]}
        assert kinds == {keras.layers.Dense}, kinds
        _unchanged(model, before)


def _rename_module(tensors):
    for key in list(tensors):
        tensors[key.replace(".query.", ".other.")] = tensors.pop(key)


def _extra_module(tensors):
    for key in list(tensors):
        tensors[key.replace(".query.", ".other.")] = tensors[key]


def _peft_bfloat16(tmp):
    import safetensors

    from keras_qlora.interop import load_peft_adapter

    model, path = _peft(tmp)
    tensors = safetensors.deserialize((path / ADAPTER_W).read_bytes())
    head, body, offset = {}, b"", 0
    for key, entry in tensors:
        value = np.frombuffer(entry["data"], "<f4")
        raw = (value.view(np.uint32) >> 16).astype("<u2").tobytes()
        head[key] = {
            "dtype": "BF16",
            "shape": entry["shape"],
            "data_offsets": [offset, offset + len(raw)],
        }
        body, offset = body + raw, offset + len(raw)
    (path / ADAPTER_W).write_bytes(_raw_safetensors(head, body))
    fresh = _model()
    load_peft_adapter(fresh, path, naming=None)
    b = _lora(model).lora_b.numpy()
    want = ((b.view(np.uint32) >> 16) << 16).view(np.float32)
    np.testing.assert_array_equal(_lora(fresh).lora_b.numpy(), want)


PEFT_CFG = ADAPTER_CFG
PEFT_CASES = [
    Case(
        "load_peft_adapter",
        "missing folder",
        lambda tmp: _peft_load_path(tmp / "nowhere"),
        Refused(
            FileNotFoundError, r"No PEFT adapter", names=("{tmp}/nowhere",)
        ),
    ),
    Case(
        "load_peft_adapter",
        "missing weights file",
        lambda tmp: _peft_load(tmp, lambda p: (p / ADAPTER_W).unlink()),
        Refused(FileNotFoundError, r"file missing", names=(ADAPTER_W,)),
    ),
    Case(
        "load_peft_adapter",
        "config is not JSON",
        lambda tmp: _peft_load(tmp, lambda p: (p / PEFT_CFG).write_text("{r:")),
        Refused(ValueError, r"is not valid JSON", names=(PEFT_CFG,)),
    ),
    Case(
        "load_peft_adapter",
        "config is a JSON list",
        lambda tmp: _peft_load(tmp, lambda p: (p / PEFT_CFG).write_text("[]")),
        Refused(ValueError, r"must hold a JSON object", names=(PEFT_CFG,)),
    ),
    Case(
        "load_peft_adapter",
        "peft_type PREFIX_TUNING",
        lambda tmp: _peft_load(
            tmp, _peft_config(_setf("peft_type", "PREFIX_TUNING"))
        ),
        Refused(ValueError, r"only LoRA", names=("peft_type", PEFT_CFG)),
    ),
    Case(
        "load_peft_adapter",
        "a DoRA adapter",
        lambda tmp: _peft_load(tmp, _peft_config(_setf("use_dora", True))),
        Refused(ValueError, r"DoRA", names=("use_dora",)),
    ),
    Case(
        "load_peft_adapter",
        "no field r",
        lambda tmp: _peft_load(tmp, _peft_config(lambda c: c.pop("r"))),
        Refused(ValueError, r"no field 'r'", names=(PEFT_CFG,)),
    ),
    Case(
        "load_peft_adapter",
        "r = 0",
        lambda tmp: _peft_load(tmp, _peft_config(_setf("r", 0))),
        Refused(ValueError, r"'r' must be a positive int", names=("r=0",)),
    ),
    Case(
        "load_peft_adapter",
        "lora_alpha NaN",
        lambda tmp: _peft_load(
            tmp, _peft_config(_setf("lora_alpha", math.nan))
        ),
        Refused(ValueError, r"'lora_alpha' must be a number", names=("nan",)),
    ),
    Case(
        "load_peft_adapter",
        "lora_alpha a string",
        lambda tmp: _peft_load(tmp, _peft_config(_setf("lora_alpha", "4"))),
        Refused(ValueError, r"'lora_alpha' must be a number"),
    ),
    Case(
        "load_peft_adapter",
        "use_rslora a string",
        lambda tmp: _peft_load(tmp, _peft_config(_setf("use_rslora", "yes"))),
        Refused(ValueError, r"'use_rslora' must be true or false"),
    ),
    Case(
        "load_peft_adapter",
        "rank_pattern with a global flag",
        lambda tmp: _peft_load(
            tmp, _peft_config(_setf("rank_pattern", {"(?i)query": 2}))
        ),
        Refused(
            ValueError, r"not a valid module pattern", names=("(?i)query",)
        ),
    ),
    Case(
        "load_peft_adapter",
        "rank_pattern rank 0",
        lambda tmp: _peft_load(
            tmp, _peft_config(_setf("rank_pattern", {"query": 0}))
        ),
        Refused(ValueError, r"must map module patterns to positive ints"),
    ),
    Case(
        "load_peft_adapter",
        "target_modules a number",
        lambda tmp: _peft_load(tmp, _peft_config(_setf("target_modules", 5))),
        Refused(ValueError, r"'target_modules' must be", names=("5",)),
    ),
    Case(
        "load_peft_adapter",
        "weights truncated",
        lambda tmp: _peft_load(
            tmp,
            lambda p: (p / ADAPTER_W).write_bytes(
                (p / ADAPTER_W).read_bytes()[:60]
            ),
        ),
        Refused(ValueError, r"not a readable safetensors", names=(ADAPTER_W,)),
    ),
    Case(
        "load_peft_adapter",
        "safetensors offsets beyond the data",
        lambda tmp: _peft_load(
            tmp,
            lambda p: (p / ADAPTER_W).write_bytes(
                _raw_safetensors(
                    {
                        PEFT_A: {
                            "dtype": "F32",
                            "shape": [2, 16],
                            "data_offsets": [0, 1 << 33],
                        }
                    },
                    bytes(128),
                )
            ),
        ),
        Refused(ValueError, r"not a readable safetensors", names=(ADAPTER_W,)),
        isolate=True,
    ),
    Case(
        "load_peft_adapter",
        "a LoRA bias tensor",
        lambda tmp: _peft_load(
            tmp,
            _peft_tensors(
                lambda t: t.update(
                    {"base_model.model.query.lora_B.bias": np.zeros(8, "f4")}
                )
            ),
        ),
        Refused(ValueError, r"not LoRA A/B weights", names=("lora_B.bias",)),
    ),
    Case(
        "load_peft_adapter",
        "lora_A without lora_B",
        lambda tmp: _peft_load(tmp, _peft_tensors(lambda t: t.pop(PEFT_B))),
        Refused(ValueError, r"lora_A or lora_B but not both", names=("query",)),
    ),
    Case(
        "load_peft_adapter",
        "lora_A one-dimensional",
        lambda tmp: _peft_load(
            tmp, _peft_tensors(lambda t: t.update({PEFT_A: np.zeros(32, "f4")}))
        ),
        Refused(
            ValueError, r"must be \[r, in\] and \[out, r\]", names=("query",)
        ),
    ),
    Case(
        "load_peft_adapter",
        "lora_A of another input size",
        lambda tmp: _peft_load(
            tmp,
            _peft_tensors(
                lambda t: t.update({PEFT_A: np.zeros((2, 10), "f4")})
            ),
        ),
        Refused(ValueError, r"maps \[in=10\]", names=("query",)),
    ),
    Case(
        "load_peft_adapter",
        "config r differs from the weights' rank",
        lambda tmp: _peft_load(tmp, _peft_config(_setf("r", 4))),
        Refused(ValueError, r"rank 2 but the config gives it r=4"),
    ),
    Case(
        "load_peft_adapter",
        "lora_alpha differs from the model's",
        lambda tmp: _peft_load(tmp, _peft_config(_setf("lora_alpha", 8))),
        Refused(ValueError, r"scales B @ A.*layer 'query'"),
    ),
    Case(
        "load_peft_adapter",
        "NaN in lora_B",
        lambda tmp: _peft_load(
            tmp,
            _peft_tensors(
                lambda t: t.update({PEFT_B: np.full((8, 2), np.nan, "f4")})
            ),
        ),
        Refused(ValueError, r"lora_B has NaN or Inf", names=("query",)),
    ),
    Case(
        "load_peft_adapter",
        "int32 weights",
        lambda tmp: _peft_load(
            tmp,
            _peft_tensors(
                lambda t: t.update({PEFT_A: np.zeros((2, 16), "i4")})
            ),
        ),
        Refused(ValueError, r"has dtype I32", names=(PEFT_A,)),
    ),
    Case(
        "load_peft_adapter",
        "an extra module the model lacks",
        lambda tmp: _peft_load(tmp, _peft_tensors(_extra_module)),
        Refused(ValueError, r"does not match the model's LoRA layers.*other"),
    ),
    Case(
        "load_peft_adapter",
        "only modules the model lacks",
        lambda tmp: _peft_load(tmp, _peft_tensors(_rename_module)),
        Refused(ValueError, r"no key of the model's modules was found"),
    ),
    Case(
        "load_peft_adapter",
        "unknown naming",
        lambda tmp: _peft_load(tmp, naming="hf-nope"),
        Refused(ValueError, r"naming", names=("hf-nope",)),
    ),
    Case("load_peft_adapter", "bfloat16 weights", _peft_bfloat16, Correct()),
    Case(
        "save_peft_adapter",
        "existing adapter, overwrite=False",
        lambda tmp: _peft_save_kept(tmp),
        Refused(FileExistsError, r"overwrite=True", names=("{tmp}/peft",)),
    ),
    Case(
        "save_peft_adapter",
        "overwrite='yes' (not a bool)",
        lambda tmp: _peft_save_kept(tmp, overwrite="yes"),
        Refused(TypeError, r"overwrite must be a bool", names=("overwrite",)),
    ),
    Case(
        "save_peft_adapter",
        "NaN weights over a good adapter",
        lambda tmp: _peft_save_kept(tmp, _poison, overwrite=True),
        Refused(ValueError, r"NaN or Inf", names=("query",)),
    ),
    Case(
        "save_peft_adapter",
        "a model with modules_to_save",
        lambda tmp: _peft(tmp, _model(modules_to_save=["head"])),
        Refused(ValueError, r"modules_to_save \['head'\]"),
    ),
    Case(
        "save_peft_adapter",
        "path is a file, overwrite=True",
        lambda tmp: _kept_file(tmp, lambda p: _peft_save_to(p, overwrite=True)),
        Refused(ValueError, r"not an adapter directory", names=("{tmp}",)),
    ),
    Case(
        "apply_peft_adapter",
        "rank passed by hand",
        lambda tmp: _peft_apply(tmp, rank=4),
        Refused(TypeError, r"from the adapter's config", names=("rank",)),
    ),
    Case(
        "apply_peft_adapter",
        "missing folder",
        lambda tmp: _peft_apply(tmp, lambda p: shutil.rmtree(p)),
        Refused(FileNotFoundError, r"No PEFT adapter", names=("{tmp}/peft",)),
    ),
    Case(
        "apply_peft_adapter",
        "a module the model lacks",
        lambda tmp: _peft_apply(tmp, _peft_tensors(_extra_module)),
        Refused(ValueError, r"PEFT module 'other' .* has no linear layer"),
    ),
    Case(
        "apply_peft_adapter",
        "NaN in lora_B",
        lambda tmp: _peft_apply(
            tmp,
            _peft_tensors(
                lambda t: t.update({PEFT_B: np.full((8, 2), np.nan, "f4")})
            ),
        ),
        Refused(ValueError, r"NaN or Inf", names=("query",)),
    ),
    Case(
        "apply_peft_adapter",
        "lora_A of another input size",
        lambda tmp: _peft_apply(
            tmp,
            _peft_tensors(
                lambda t: t.update({PEFT_A: np.zeros((2, 10), "f4")})
            ),
        ),
        Refused(ValueError, r"in=10", names=("query",)),
    ),
    Case(
        "apply_peft_adapter",
        "lora_A and lora_B ranks differ",
        lambda tmp: _peft_apply(
            tmp,
            _peft_tensors(
                lambda t: t.update({PEFT_A: np.zeros((3, 16), "f4")})
            ),
        ),
        Refused(ValueError, r"\[r, in\] and \[out, r\]", names=("query",)),
    ),
]


def _peft_load_path(path):
    from keras_qlora.interop import load_peft_adapter

    load_peft_adapter(_model(), path, naming=None)


def _peft_save_to(path, **kw):
    from keras_qlora.interop import save_peft_adapter

    save_peft_adapter(_model(), path, naming=None, **kw)


# -- bitsandbytes -------------------------------------------------------------

BNB_META = "weight.quant_state.bitsandbytes__nf4"


def _bnb_sd(double_quant=True):
    from keras_qlora.interop import to_bitsandbytes
    from keras_qlora.quantizers import quantize_nf4

    kernel = np.random.default_rng(0).normal(size=(16, 8)).astype("f4")
    return to_bitsandbytes(quantize_nf4(kernel, double_quant=double_quant))


def _from_bnb(edit=None, double_quant=True, prefix="weight"):
    from keras_qlora.interop import from_bitsandbytes

    sd = _bnb_sd(double_quant)
    if edit:
        edit(sd)
    return from_bitsandbytes(sd, prefix=prefix)


def _meta(edit=None, raw=None):
    """Edits the JSON of the quant_state entry (or replaces its bytes)."""

    def apply(sd):
        data = raw
        if data is None:
            meta = json.loads(sd[BNB_META].tobytes())
            edit(meta)
            data = json.dumps(meta).encode()
        sd[BNB_META] = np.frombuffer(data, np.uint8).copy()

    return apply


def _entry(key, value):
    return lambda sd: sd.update({key: value})


def _torch_bf16_absmax(sd):
    import torch

    sd["weight.absmax"] = torch.zeros(4, dtype=torch.bfloat16)


def _torch_round_trip(tmp):
    import torch

    from keras_qlora.interop import from_bitsandbytes
    from keras_qlora.quantizers import dequantize_nf4

    sd = _bnb_sd()
    back = from_bitsandbytes({k: torch.from_numpy(v) for k, v in sd.items()})
    np.testing.assert_array_equal(
        dequantize_nf4(back), dequantize_nf4(_from_bnb())
    )


def _real_bnb(quant_type="nf4", double_quant=True, blocksize=64):
    """A state bitsandbytes wrote; read, it holds the bytes our quantizer
    gives (bitsandbytes' CPU dequantize_4bit is not the oracle: in 0.50
    it does not invert its own CPU quantize_4bit)."""
    import bitsandbytes.functional as bnbf
    import torch

    from keras_qlora.interop import from_bitsandbytes
    from keras_qlora.quantizers import quantize_nf4

    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    packed, state = bnbf.quantize_4bit(
        weight,
        blocksize=blocksize,
        quant_type=quant_type,
        compress_statistics=double_quant,
    )
    sd = {"w": packed}
    sd.update({f"w.{k}": v for k, v in state.as_dict(packed=True).items()})
    ours = from_bitsandbytes(sd, prefix="w")
    kernel = weight.numpy().T
    want = quantize_nf4(kernel, blocksize, double_quant, scale_search=False)
    np.testing.assert_array_equal(ours.packed, want.packed)
    np.testing.assert_allclose(
        ours.block_absmax(), want.block_absmax(), rtol=1e-2
    )


BNB = ("torch", "bitsandbytes")
BNB_CASES = [
    Case(
        "from_bitsandbytes",
        "a list, not a mapping",
        lambda tmp: _from_bnb_value([1, 2]),
        Refused(TypeError, r"expects a state_dict mapping", names=("list",)),
    ),
    Case(
        "from_bitsandbytes",
        "no quant_state entry",
        lambda tmp: _from_bnb(lambda sd: sd.pop(BNB_META)),
        Refused(ValueError, r"needs exactly one key", names=(BNB_META,)),
    ),
    Case(
        "from_bitsandbytes",
        "quant_state not UTF-8 JSON",
        lambda tmp: _from_bnb(_meta(raw=b"\xff\x00{")),
        Refused(ValueError, r"bytes of a UTF-8 JSON dict", names=(BNB_META,)),
    ),
    Case(
        "from_bitsandbytes",
        "quant_state nested 100000 deep",
        lambda tmp: _from_bnb(_meta(raw=b"[" * 100_000 + b"]" * 100_000)),
        Refused(ValueError, r"bytes of a UTF-8 JSON dict", names=(BNB_META,)),
    ),
    Case(
        "from_bitsandbytes",
        "quant_state a JSON list",
        lambda tmp: _from_bnb(_meta(raw=b"[64]")),
        Refused(ValueError, r"must decode to a JSON dict", names=(BNB_META,)),
    ),
    Case(
        "from_bitsandbytes",
        "quant_state without blocksize",
        lambda tmp: _from_bnb(_meta(lambda m: m.pop("blocksize"))),
        Refused(ValueError, r"lacks fields \['blocksize'\]"),
    ),
    Case(
        "from_bitsandbytes",
        "blocksize 4096",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(blocksize=4096))),
        Refused(ValueError, r"'blocksize'.*must be one of", names=("4096",)),
    ),
    Case(
        "from_bitsandbytes",
        "blocksize 64.0",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(blocksize=64.0))),
        Refused(ValueError, r"'blocksize'.*must be one of", names=("64.0",)),
    ),
    Case(
        "from_bitsandbytes",
        "shape of one dimension",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(shape=[128]))),
        Refused(ValueError, r"'shape'.*two positive ints", names=("[128]",)),
    ),
    Case(
        "from_bitsandbytes",
        "negative shape",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(shape=[-8, -16]))),
        Refused(ValueError, r"'shape'.*two positive ints"),
    ),
    Case(
        "from_bitsandbytes",
        "shape that does not fit the bytes",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(shape=[16, 16]))),
        Refused(ValueError, r"must hold ceil\(N \* K / 2\) = 128 bytes"),
    ),
    Case(
        "from_bitsandbytes",
        "dtype float64",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(dtype="float64"))),
        Refused(ValueError, r"'dtype'.*must be one of", names=("float64",)),
    ),
    Case(
        "from_bitsandbytes",
        "fp4 weight",
        lambda tmp: _from_bnb(
            lambda sd: sd.update(
                {BNB_META.replace("nf4", "fp4"): sd.pop(BNB_META)}
            )
        ),
        Refused(ValueError, r"only 'nf4' is supported", names=("fp4",)),
    ),
    Case(
        "from_bitsandbytes",
        "nested_offset beyond float32",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(nested_offset=1e39))),
        Refused(
            ValueError, r"'nested_offset'.*finite in float32", names=("1e+39",)
        ),
    ),
    Case(
        "from_bitsandbytes",
        "nested_offset NaN",
        lambda tmp: _from_bnb(
            _meta(lambda m: m.update(nested_offset=math.nan))
        ),
        Refused(
            ValueError, r"'nested_offset'.*finite in float32", names=("nan",)
        ),
    ),
    Case(
        "from_bitsandbytes",
        "nested_offset a string",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(nested_offset="0.1"))),
        Refused(ValueError, r"'nested_offset'.*must be a number"),
    ),
    Case(
        "from_bitsandbytes",
        "nested_absmax missing",
        lambda tmp: _from_bnb(lambda sd: sd.pop("weight.nested_absmax")),
        Refused(ValueError, r"double-quantized weight needs keys"),
    ),
    Case(
        "from_bitsandbytes",
        "nested_absmax NaN",
        lambda tmp: _from_bnb(
            _entry("weight.nested_absmax", np.full(1, np.nan, "f4"))
        ),
        Refused(ValueError, r"must be finite", names=("weight.nested_absmax",)),
    ),
    Case(
        "from_bitsandbytes",
        "absmax Inf (no double quant)",
        lambda tmp: _from_bnb(
            _entry("weight.absmax", np.full(2, np.inf, "f4")),
            double_quant=False,
        ),
        Refused(ValueError, r"must be finite", names=("weight.absmax",)),
    ),
    Case(
        "from_bitsandbytes",
        "absmax float16",
        lambda tmp: _from_bnb(_entry("weight.absmax", np.zeros(2, "f2"))),
        Refused(
            ValueError, r"must be uint8 with shape \[2\]", names=("float16",)
        ),
    ),
    Case(
        "from_bitsandbytes",
        "packed weight float32",
        lambda tmp: _from_bnb(_entry("weight", np.zeros((64, 1), "f4"))),
        Refused(ValueError, r"'weight' must be uint8", names=("float32",)),
    ),
    Case(
        "from_bitsandbytes",
        "quant_map not NF4",
        lambda tmp: _from_bnb(_entry("weight.quant_map", np.zeros(16, "f4"))),
        Refused(ValueError, r"NF4 code table", names=("weight.quant_map",)),
    ),
    Case(
        "from_bitsandbytes",
        "an entry of Python objects",
        lambda tmp: _from_bnb(_entry("weight.absmax", [object(), object()])),
        Refused(TypeError, r"must be an array", names=("weight.absmax",)),
    ),
    Case(
        "from_bitsandbytes",
        "empty prefix",
        lambda tmp: _from_bnb(prefix=""),
        Refused(ValueError, r"prefix must be the non-empty key"),
    ),
    Case(
        "from_bitsandbytes",
        "prefix of the wrong type",
        lambda tmp: _from_bnb(prefix=5),
        Refused(TypeError, r"prefix must be", names=("prefix=5",)),
    ),
    Case(
        "from_bitsandbytes",
        "a prefix the state dict lacks",
        lambda tmp: _from_bnb(prefix="model.fc.weight"),
        Refused(
            ValueError, r"needs exactly one key", names=("model.fc.weight",)
        ),
    ),
    Case(
        "from_bitsandbytes",
        "torch bfloat16 absmax",
        lambda tmp: _from_bnb(_torch_bf16_absmax),
        Refused(TypeError, r"cannot read", names=("weight.absmax",)),
        needs=("torch",),
    ),
    Case(
        "from_bitsandbytes",
        "torch tensors",
        _torch_round_trip,
        Correct(),
        needs=("torch",),
    ),
    Case(
        "from_bitsandbytes",
        "bitsandbytes' own nf4 state",
        lambda tmp: _real_bnb(),
        Correct(),
        isolate=True,
        needs=BNB,
    ),
    Case(
        "from_bitsandbytes",
        "bitsandbytes' own state, no double quant",
        lambda tmp: _real_bnb(double_quant=False),
        Correct(),
        isolate=True,
        needs=BNB,
    ),
    Case(
        "from_bitsandbytes",
        "bitsandbytes' fp4 state",
        lambda tmp: _real_bnb(quant_type="fp4"),
        Refused(ValueError, r"only 'nf4' is supported", names=("fp4",)),
        isolate=True,
        needs=BNB,
    ),
    Case(
        "from_bitsandbytes",
        "bitsandbytes' blocksize 4096",
        lambda tmp: _real_bnb(blocksize=4096),
        Refused(ValueError, r"'blocksize'.*must be one of", names=("4096",)),
        isolate=True,
        needs=BNB,
    ),
    Case(
        "to_bitsandbytes",
        "a float kernel, not a state",
        lambda tmp: _to_bnb(np.zeros((16, 8), "f4")),
        Refused(TypeError, r"expects an NF4State", names=("ndarray",)),
    ),
    Case(
        "to_bitsandbytes",
        "prefix None",
        lambda tmp: _to_bnb(_from_bnb(), prefix=None),
        Refused(TypeError, r"prefix must be", names=("prefix=None",)),
    ),
    Case(
        "to_bitsandbytes_model",
        "a plain Keras model",
        lambda tmp: _to_bnb_model(_float_model()),
        Refused(TypeError, r"expects the model returned by .*apply"),
    ),
    Case(
        "to_bitsandbytes_model",
        "unknown naming",
        lambda tmp: _to_bnb_model(_model(), naming="hf-nope"),
        Refused(ValueError, r"naming", names=("hf-nope",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "a plain Keras model",
        lambda tmp: _from_bnb_model(_float_model()),
        Refused(TypeError, r"expects the model returned by .*apply"),
    ),
    Case(
        "from_bitsandbytes_model",
        "a list, not a mapping",
        lambda tmp: _from_bnb_model(_model(), lambda sd: list(sd)),
        Refused(TypeError, r"expects a state_dict mapping", names=("list",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "another block size",
        lambda tmp: _from_bnb_model(_model(), source=_model(block_size=32)),
        Refused(ValueError, r"block size 32.*uses 64", names=("query",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "a weight of another shape",
        lambda tmp: _from_bnb_model(_model(), _swap_weight),
        Refused(ValueError, r"holds a weight \[out, in\]", names=("query",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "a module missing",
        lambda tmp: _from_bnb_model(_model(), _drop("query.weight")),
        Refused(ValueError, r"lacks 1 key", names=("query.weight",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "an unused key (strict)",
        lambda tmp: _from_bnb_model(
            _model(), lambda sd: dict(sd, extra=np.zeros(2, "f4"))
        ),
        Refused(ValueError, r"match no QLoRA layer", names=("extra",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "a stray 4-bit weight (strict=False)",
        lambda tmp: _from_bnb_model(_model(), _stray_weight, strict=False),
        Refused(ValueError, r"match no QLoRA layer", names=("other.weight",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "NaN bias",
        lambda tmp: _from_bnb_model(_model(), _nan_bias),
        Refused(ValueError, r"holds NaN or Inf", names=("query.bias",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "corrupt quant_state of one module",
        lambda tmp: _from_bnb_model(_model(), _corrupt_head),
        Refused(ValueError, r"UTF-8 JSON", names=("head.weight",)),
    ),
]


def _from_bnb_value(value):
    from keras_qlora.interop import from_bitsandbytes

    return from_bitsandbytes(value)


def _to_bnb(value, **kw):
    from keras_qlora.interop import to_bitsandbytes

    return to_bitsandbytes(value, **kw)


def _to_bnb_model(model, **kw):
    from keras_qlora.interop import to_bitsandbytes_model

    return to_bitsandbytes_model(model, **kw)


def _from_bnb_model(model, edit=None, source=None, **kw):
    """Loads a state dict of `source` (a model like `model`), edited, into
    `model`, which a refusal leaves unchanged."""
    from keras_qlora.interop import from_bitsandbytes_model

    sd = _to_bnb_model(source or _model(seed=1))
    if edit:
        sd = edit(sd)
    _refused_unchanged(lambda: from_bitsandbytes_model(model, sd, **kw), model)


def _drop(key):
    return lambda sd: {k: v for k, v in sd.items() if not k.startswith(key)}


def _swap_weight(sd):
    # The head's entries under the query's name: [4, 8] instead of [8, 16].
    out = dict(sd)
    for key in [k for k in sd if k.startswith("query.weight")]:
        out[key] = sd[key.replace("query.", "head.")]
    return out


def _stray_weight(sd):
    out = dict(sd)
    for key in [k for k in sd if k.startswith("head.weight")]:
        out[key.replace("head.", "other.")] = sd[key]
    return out


def _nan_bias(sd):
    return dict(sd, **{"query.bias": np.full(8, np.nan, "f4")})


def _corrupt_head(sd):
    key = "head.weight.quant_state.bitsandbytes__nf4"
    return dict(sd, **{key: np.frombuffer(b"\xff{", np.uint8)})


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


# -- training checkpoints -----------------------------------------------------

STATE = "trainer_state.json"
OPT = "optimizer.safetensors"


def _trained(seed=0, optimizer="adam"):
    """A compiled model with its optimizer built and moments non-zero."""
    model = _model(seed=seed)
    model.compile(optimizer=optimizer, loss="mse")
    model.optimizer.build(model.trainable_variables)
    for v in model.optimizer.variables:
        if "momentum" in v.name or "velocity" in v.name:
            v.assign(np.full(v.shape, 0.01, "f4"))
    return model


def _ckpt(tmp, model=None, edit=None):
    from keras_qlora import training

    model = model or _trained()
    _randomize(model)
    path = training.save_checkpoint(model, tmp / "run", epoch=2)
    if edit:
        edit(tmp / "run" / os.path.basename(path))
    return model


def _restore(tmp, edit=None, model=None, into=None):
    """Restores an edited checkpoint into `into` (a fresh compiled model),
    which a refusal leaves unchanged."""
    from keras_qlora import training

    _ckpt(tmp, model, edit)
    into = into or _model()
    if getattr(into, "optimizer", None) is None and into is not False:
        into.compile(optimizer="adam", loss="mse")
    _refused_unchanged(
        lambda: training.restore_checkpoint(into, tmp / "run"), into
    )


def _state(edit):
    def apply(path):
        state = json.loads((path / STATE).read_text())
        edit(state)
        (path / STATE).write_text(json.dumps(state))

    return apply


def _opt_tensors(edit):
    def apply(path):
        import safetensors.numpy

        state = json.loads((path / STATE).read_text())
        tensors = safetensors.numpy.load((path / OPT).read_bytes())
        by_name = {e["name"]: str(e["index"]) for e in state["optimizer"]}
        edit(tensors, by_name)
        (path / OPT).write_bytes(safetensors.numpy.save(tensors))

    return apply


def _nan_moment(tensors, by_name):
    key = next(v for k, v in by_name.items() if "momentum" in k)
    tensors[key] = np.full_like(tensors[key], np.nan)


def _int_moment(tensors, by_name):
    key = next(v for k, v in by_name.items() if "momentum" in k)
    tensors[key] = tensors[key].astype("int32")


def _restored_equal(tmp):
    from keras_qlora import training

    model = _ckpt(tmp)
    fresh = _model()
    fresh.compile(optimizer="adam", loss="mse")
    assert training.restore_checkpoint(fresh, tmp / "run") == 2
    np.testing.assert_array_equal(
        _lora(fresh).lora_b.numpy(), _lora(model).lora_b.numpy()
    )
    for got, want in zip(
        fresh.optimizer.variables, model.optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def _save_ckpt_kept(tmp, prepare=None, **kw):
    """A good checkpoint in tmp/run, then a save that must fail."""
    from keras_qlora import training

    model = _ckpt(tmp)
    if prepare:
        prepare(model)
    kw.setdefault("epoch", 3)
    with files_kept(tmp):
        training.save_checkpoint(model, tmp / "run", **kw)


def _nan_optimizer(model):
    v = next(v for v in model.optimizer.variables if "momentum" in v.name)
    v.assign(np.full(v.shape, np.nan, "f4"))


CKPT_CASES = [
    Case(
        "restore_checkpoint",
        "missing folder",
        lambda tmp: _restore_path(tmp / "none"),
        Refused(
            FileNotFoundError, r"No complete checkpoint", names=("{tmp}/none",)
        ),
    ),
    Case(
        "restore_checkpoint",
        "a folder without checkpoints",
        lambda tmp: _restore_path(tmp),
        Refused(FileNotFoundError, r"No complete checkpoint", names=("{tmp}",)),
    ),
    Case(
        "restore_checkpoint",
        "path is a file",
        lambda tmp: _restore_path(_write_file(tmp, "run")),
        Refused(
            FileNotFoundError, r"No complete checkpoint", names=("{tmp}/run",)
        ),
    ),
    Case(
        "restore_checkpoint",
        "a plain Keras model",
        lambda tmp: _restore(tmp, into=_float_model()),
        Refused(TypeError, r"expects the model returned by .*apply"),
    ),
    Case(
        "restore_checkpoint",
        "an uncompiled model",
        lambda tmp: _restore_uncompiled(tmp),
        Refused(ValueError, r"is not compiled", names=("restore_checkpoint",)),
    ),
    Case(
        "restore_checkpoint",
        "trainer_state.json missing",
        lambda tmp: _restore(tmp, lambda p: (p / STATE).unlink()),
        Refused(FileNotFoundError, r"file missing", names=(STATE,)),
    ),
    Case(
        "restore_checkpoint",
        "trainer_state.json not JSON",
        lambda tmp: _restore(tmp, lambda p: (p / STATE).write_text("{epoch")),
        Refused(ValueError, r"is not valid JSON", names=(STATE,)),
    ),
    Case(
        "restore_checkpoint",
        "trainer_state.json nested 100000 deep",
        lambda tmp: _restore(
            tmp,
            lambda p: (p / STATE).write_bytes(b"[" * 100_000 + b"]" * 100_000),
        ),
        Refused(ValueError, r"is not valid JSON", names=(STATE,)),
    ),
    Case(
        "restore_checkpoint",
        "negative epoch",
        lambda tmp: _restore(tmp, _state(lambda s: s.update(epoch=-5))),
        Refused(ValueError, r"non-negative int 'epoch'", names=(STATE,)),
    ),
    Case(
        "restore_checkpoint",
        "epoch a string",
        lambda tmp: _restore(tmp, _state(lambda s: s.update(epoch="2"))),
        Refused(ValueError, r"non-negative int 'epoch'", names=(STATE,)),
    ),
    Case(
        "restore_checkpoint",
        "another format_version",
        lambda tmp: _restore(tmp, _state(lambda s: s.update(format_version=7))),
        Refused(
            ValueError, r"not a keras_qlora checkpoint state", names=(STATE,)
        ),
    ),
    Case(
        "restore_checkpoint",
        "an optimizer entry not an object",
        lambda tmp: _restore(
            tmp, _state(lambda s: s["optimizer"].__setitem__(0, 3))
        ),
        Refused(ValueError, r"must be an object", names=(STATE,)),
    ),
    Case(
        "restore_checkpoint",
        "an optimizer entry of another shape",
        lambda tmp: _restore(
            tmp, _state(lambda s: s["optimizer"][-1].update(shape=[9, 9]))
        ),
        Refused(ValueError, r"Optimizer variable \d+ differs"),
    ),
    Case(
        "restore_checkpoint",
        "adapter_name of another adapter",
        lambda tmp: _restore(tmp, _state(lambda s: s.update(adapter_name="x"))),
        Refused(ValueError, r"trained adapter 'x'", names=("default",)),
    ),
    Case(
        "restore_checkpoint",
        "NaN moments",
        lambda tmp: _restore(tmp, _opt_tensors(_nan_moment)),
        Refused(ValueError, r"holds NaN or Inf", names=(OPT, "momentum")),
    ),
    Case(
        "restore_checkpoint",
        "int32 moments",
        lambda tmp: _restore(tmp, _opt_tensors(_int_moment)),
        Refused(ValueError, r"is missing or is not float32", names=(OPT,)),
    ),
    Case(
        "restore_checkpoint",
        "optimizer.safetensors missing",
        lambda tmp: _restore(tmp, lambda p: (p / OPT).unlink()),
        Refused(FileNotFoundError, r"file missing", names=(OPT,)),
    ),
    Case(
        "restore_checkpoint",
        "optimizer.safetensors truncated",
        lambda tmp: _restore(
            tmp, lambda p: (p / OPT).write_bytes((p / OPT).read_bytes()[:40])
        ),
        Refused(ValueError, r"not a readable safetensors", names=(OPT,)),
    ),
    Case(
        "restore_checkpoint",
        "adapter folder missing",
        lambda tmp: _restore(tmp, lambda p: shutil.rmtree(p / "adapter")),
        Refused(FileNotFoundError, r"No adapter directory", names=("adapter",)),
    ),
    Case(
        "restore_checkpoint",
        "adapter weights with NaN",
        lambda tmp: _restore(
            tmp,
            lambda p: _edit_tensors(
                p / "adapter", _fill("query/lora_b", np.nan)
            ),
        ),
        Refused(ValueError, r"holds NaN or Inf", names=("query/lora_b",)),
    ),
    Case(
        "restore_checkpoint",
        "a checkpoint of another base model",
        lambda tmp: _restore(tmp, model=_trained(seed=1)),
        Refused(ValueError, r"different base model"),
    ),
    Case(
        "restore_checkpoint",
        "a checkpoint of another optimizer",
        lambda tmp: _restore(tmp, model=_trained(optimizer="sgd")),
        Refused(ValueError, r"optimizer has \d+ variables"),
    ),
    Case("restore_checkpoint", "a good checkpoint", _restored_equal, Correct()),
    Case(
        "save_checkpoint",
        "negative epoch",
        lambda tmp: _save_ckpt_kept(tmp, epoch=-1),
        Refused(
            ValueError, r"epoch must be a non-negative int", names=("epoch=-1",)
        ),
    ),
    Case(
        "save_checkpoint",
        "epoch a float",
        lambda tmp: _save_ckpt_kept(tmp, epoch=2.0),
        Refused(
            TypeError, r"epoch must be a non-negative int", names=("epoch=2.0",)
        ),
    ),
    Case(
        "save_checkpoint",
        "keep=0",
        lambda tmp: _save_ckpt_kept(tmp, keep=0),
        Refused(ValueError, r"keep must be a positive int", names=("keep=0",)),
    ),
    Case(
        "save_checkpoint",
        "keep=-1",
        lambda tmp: _save_ckpt_kept(tmp, keep=-1),
        Refused(ValueError, r"keep must be a positive int", names=("keep=-1",)),
    ),
    Case(
        "save_checkpoint",
        "keep a string",
        lambda tmp: _save_ckpt_kept(tmp, keep="2"),
        Refused(
            ValueError, r"keep must be a positive int", names=("keep='2'",)
        ),
    ),
    Case(
        "save_checkpoint",
        "NaN adapter",
        lambda tmp: _save_ckpt_kept(tmp, _poison),
        Refused(ValueError, r"NaN or Inf.*diverged", names=("query/lora_b",)),
    ),
    Case(
        "save_checkpoint",
        "NaN moments",
        lambda tmp: _save_ckpt_kept(tmp, _nan_optimizer),
        Refused(
            ValueError,
            r"NaN or Inf.*No checkpoint was written",
            names=("momentum",),
        ),
    ),
    Case(
        "save_checkpoint",
        "extra not JSON-serializable",
        lambda tmp: _save_ckpt_kept(tmp, extra={"loss": object()}),
        Refused(TypeError, r"extra must be a dict", names=("extra=",)),
    ),
    Case(
        "save_checkpoint",
        "an uncompiled model",
        lambda tmp: _save_uncompiled(tmp),
        Refused(ValueError, r"is not compiled", names=("save_checkpoint",)),
    ),
    Case(
        "save_checkpoint",
        "directory is a file",
        lambda tmp: _kept_file(tmp, lambda p: _save_ckpt_to(p)),
        Refused(NotADirectoryError, r"is a file", names=("{tmp}/adapter",)),
    ),
]


def _restore_path(path):
    from keras_qlora import training

    model = _model()
    model.compile(optimizer="adam", loss="mse")
    training.restore_checkpoint(model, path)


def _restore_uncompiled(tmp):
    from keras_qlora import training

    _ckpt(tmp)
    training.restore_checkpoint(_model(), tmp / "run")


def _save_uncompiled(tmp):
    from keras_qlora import training

    training.save_checkpoint(_model(), tmp / "run", epoch=1)


def _save_ckpt_to(path):
    from keras_qlora import training

    training.save_checkpoint(_trained(), path, epoch=1)


CASES = (
    ADAPTER_CASES
    + PEFT_CASES
    + BNB_CASES
    + KERAS_CASES
    + SAVED_MODEL_CASES
    + CKPT_CASES
)
