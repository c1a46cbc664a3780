"""Catalog cases (see catalog.py): every file reader and writer.

Adapters (`save_adapter` / `load_adapter`), PEFT adapters, bitsandbytes
state dicts, `.keras` files, SavedModels and training checkpoints. Each
writer has at least one failed write that must leave the previous good
files byte-identical (`files_kept`). Models are one or two small Dense
layers, seeded, so that an adapter written by one case's model fits
another's.
"""

import hashlib
import json
import math
import os
import shutil
import struct

import numpy as np

try:
    from .catalog import Case
    from .catalog import Correct
    from .catalog import Refused
    from .catalog import files_kept
except ImportError:  # run as `python tests/robustness/catalog.py`
    from __main__ import Case
    from __main__ import Correct
    from __main__ import Refused
    from __main__ import files_kept

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


CASES = ADAPTER_CASES + PEFT_CASES
