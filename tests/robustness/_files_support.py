"""Helpers shared by the file reader and writer cases (cases_files_*.py):
the small seeded Dense models, adapter files written and edited, and the
checks that a refused read or write left everything unchanged.
"""

import hashlib
import json
import struct

import numpy as np

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


def _write_file(tmp, name="adapter", data=b"not a folder"):
    (tmp / name).write_bytes(data)
    return tmp / name


def _setf(key, value):
    return lambda config: config.update({key: value})


def _fill(key, value, dtype="f4"):
    def edit(tensors):
        tensors[key] = np.full(tensors[key].shape, value, dtype)

    return edit


def _kept_file(tmp, call):
    path = _write_file(tmp)
    with files_kept(tmp):
        call(path)
