"""save_adapter / load_adapter: contents, round trip, atomicity, bad input."""

import hashlib
import json
import os

import numpy as np
import pytest
import safetensors.numpy
from adapter_helpers import assert_unchanged
from adapter_helpers import float_model
from adapter_helpers import inputs
from adapter_helpers import qlora
from adapter_helpers import randomize
from adapter_helpers import snapshot

import keras_qlora
from keras_qlora import adapters
from keras_qlora import atomic
from keras_qlora.adapters import fingerprint as fp

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained-looking model and its adapter directory."""
    model = qlora()
    values = randomize(model, seed=1)
    path = str(tmp_path_factory.mktemp("adapters") / "a")
    adapters.save_adapter(model, path)
    return model, values, path


@pytest.fixture(scope="module")
def untouched():
    """A model with the saved adapter's settings and base weights; failed
    loads must leave it unchanged, so tests share it."""
    return qlora()


def _read_config(path):
    with open(os.path.join(path, CONFIG)) as f:
        return json.load(f)


def _rewrite(path, config=None, tensors=None, raw=None):
    """Edits an adapter copy; keeps the checksum valid unless `raw` given."""
    if tensors is not None:
        raw = safetensors.numpy.save(tensors)
    if raw is not None:
        with open(os.path.join(path, WEIGHTS), "wb") as f:
            f.write(raw)
    if config is not None:
        with open(os.path.join(path, WEIGHTS), "rb") as f:
            config["weights_sha256"] = hashlib.sha256(f.read()).hexdigest()
        with open(os.path.join(path, CONFIG), "w") as f:
            json.dump(config, f)


def _copy(src, dst):
    os.makedirs(dst)
    for name in (CONFIG, WEIGHTS):
        with open(os.path.join(src, name), "rb") as f:
            data = f.read()
        with open(os.path.join(dst, name), "wb") as f:
            f.write(data)
    return dst


def test_directory_holds_only_lora_and_head_weights(saved):
    model, _, path = saved
    assert sorted(os.listdir(path)) == [CONFIG, WEIGHTS]
    with open(os.path.join(path, WEIGHTS), "rb") as f:
        tensors = safetensors.numpy.load(f.read())
    assert sorted(tensors) == [
        "head/bias",
        "head/kernel",
        "query/lora_a",
        "query/lora_b",
        "value/lora_a",
        "value/lora_b",
    ]
    assert tensors["query/lora_a"].shape == (24, 4)
    assert tensors["value/lora_b"].shape == (4, 16)
    assert all(t.dtype == np.float32 for t in tensors.values())
    layer = model.qlora_layers()["query"]
    np.testing.assert_array_equal(tensors["query/lora_b"], layer.lora_b)
    config = _read_config(path)
    assert config["rank"] == 4 and config["alpha"] == 16.0
    assert config["target_paths"] == ["query", "value"]
    assert config["modules_to_save"] == ["head"]
    assert config["nf4"] == {
        "block_size": 64,
        "double_quant": True,
        "scale_search": True,
    }
    assert sorted(config["base_model"]["layers"]) == ["mlp", "query", "value"]
    assert config["base_model"] == fp.fingerprint(model.qlora_layers())


def test_round_trip_into_a_fresh_model(saved):
    model, _, path = saved
    fresh = qlora()  # same base weights, untrained adapter
    x = inputs()
    assert np.abs(fresh(x) - model(x)).max() > 0.1
    adapters.load_adapter(fresh, path)
    np.testing.assert_array_equal(fresh(x), model(x))
    assert len(fresh.weights) == len(model.weights)
    for mine, theirs in zip(fresh.weights, model.weights, strict=True):
        np.testing.assert_array_equal(mine, theirs, err_msg=mine.path)


def test_existing_path_needs_overwrite(saved, tmp_path):
    model, _, path = saved
    with pytest.raises(FileExistsError, match="overwrite=True"):
        adapters.save_adapter(model, path)
    target = _copy(path, str(tmp_path / "b"))
    other = qlora()
    randomize(other, seed=5)
    adapters.save_adapter(other, target, overwrite=True)
    fresh = qlora()
    adapters.load_adapter(fresh, target)
    np.testing.assert_array_equal(fresh(inputs()), other(inputs()))
    assert sorted(os.listdir(tmp_path)) == ["b"]  # no temp dirs left


def test_overwrite_refuses_a_directory_that_is_not_an_adapter(saved, tmp_path):
    model, _, _ = saved
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an adapter directory"):
        adapters.save_adapter(model, str(tmp_path), overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_failed_overwrite_keeps_the_old_adapter(saved, tmp_path, monkeypatch):
    model, _, path = saved
    target = _copy(path, str(tmp_path / "a"))
    before = {n: (tmp_path / "a" / n).read_bytes() for n in (CONFIG, WEIGHTS)}
    real_replace = os.replace

    def failing_replace(src, dst):
        # Let the old adapter move aside, fail the new one's rename.
        if atomic.TMP_MARK in os.path.basename(src):
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    other = qlora()
    randomize(other, seed=9)
    with pytest.raises(OSError, match="simulated"):
        adapters.save_adapter(other, target, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a"]
    for name, data in before.items():
        assert (tmp_path / "a" / name).read_bytes() == data


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=8), r"rank: adapter 4, model 8"),
        (dict(alpha=32), r"alpha: adapter 16.0, model 32.0"),
        (dict(scale_search=False), r"scale_search: adapter True, model False"),
        (dict(block_size=32), r"block_size: adapter 64, model 32"),
        (
            dict(target_modules=["query"]),
            r"target_paths: only in the adapter \['value'\], only in the "
            r"model \[\]",
        ),
    ],
)
def test_mismatched_settings_fail_naming_them(saved, kwargs, message):
    _, _, path = saved
    model = qlora(**kwargs)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        adapters.load_adapter(model, path)
    assert_unchanged(model, before)


def test_missing_head_is_a_modules_to_save_mismatch(saved):
    _, _, path = saved
    model = keras_qlora.apply(float_model(), rank=4, verbose=False)
    with pytest.raises(ValueError, match=r"modules_to_save: only in the "):
        adapters.load_adapter(model, path)


def test_other_base_weights_fail_naming_the_layers(saved):
    _, _, path = saved
    model = qlora(seed=3)  # same structure, other base weights
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"different base model.*in 3 layer\(s\): mlp, query, value",
    ):
        adapters.load_adapter(model, path)
    assert_unchanged(model, before)


def test_unknown_missing_and_misshapen_keys(saved, untouched, tmp_path):
    model, _, path = saved
    with open(os.path.join(path, WEIGHTS), "rb") as f:
        tensors = safetensors.numpy.load(f.read())
    fresh = untouched
    before = snapshot(fresh)
    cases = [
        (dict(tensors, **{"mlp/lora_a": np.zeros((24, 4), "f4")}), "unknown"),
        ({k: v for k, v in tensors.items() if k != "head/bias"}, "missing"),
        (
            dict(tensors, **{"value/lora_b": np.zeros((4, 15), "f4")}),
            r"'value/lora_b' has shape \(4, 15\).*\(4, 16\)",
        ),
        (
            dict(tensors, **{"value/lora_b": np.full((4, 16), np.nan, "f4")}),
            "NaN or Inf",
        ),
        (
            dict(tensors, **{"value/lora_b": np.zeros((4, 16), "int32")}),
            "dtype int32",
        ),
    ]
    for i, (edited, message) in enumerate(cases):
        copy = _copy(path, str(tmp_path / f"c{i}"))
        _rewrite(copy, config=_read_config(copy), tensors=edited)
        with pytest.raises(ValueError, match=message):
            adapters.load_adapter(fresh, copy)
        assert_unchanged(fresh, before)


def test_corrupt_and_truncated_weights(saved, untouched, tmp_path):
    _, _, path = saved
    with open(os.path.join(path, WEIGHTS), "rb") as f:
        data = f.read()
    fresh = untouched
    before = snapshot(fresh)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # inside the tensor data: the header still parses
    copy = _copy(path, str(tmp_path / "flip"))
    _rewrite(copy, raw=bytes(flipped))
    with pytest.raises(ValueError, match="does not match the checksum"):
        adapters.load_adapter(fresh, copy)
    # Truncated, with a checksum that matches the truncated bytes: the
    # safetensors parser must catch it.
    copy = _copy(path, str(tmp_path / "cut"))
    _rewrite(copy, config=_read_config(copy), raw=data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        adapters.load_adapter(fresh, copy)
    os.remove(os.path.join(copy, WEIGHTS))
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        adapters.load_adapter(fresh, copy)
    with pytest.raises(FileNotFoundError, match="No adapter directory"):
        adapters.load_adapter(fresh, str(tmp_path / "nowhere"))
    assert_unchanged(fresh, before)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(rank="4"), r"'rank' must be an int.*'4' \(str\)"),
        (lambda c: c.update(rank=True), r"'rank' must be an int"),
        (lambda c: c.update(alpha=None), r"'alpha' must be a number"),
        (
            lambda c: c["nf4"].update(double_quant=1),
            r"'nf4.double_quant' must be true or false",
        ),
        (
            lambda c: c.update(target_paths="query"),
            r"'target_paths' must be a list of strings",
        ),
        (lambda c: c.pop("base_model"), r"has no field 'base_model'"),
        (lambda c: c.update(nf4=[64]), r"nf4 must be a JSON object"),
        (lambda c: c.update(format="peft"), r"format must be"),
        (lambda c: c.update(format_version=2), r"format_version=2"),
    ],
)
def test_config_with_wrong_types(saved, untouched, tmp_path, edit, message):
    _, _, path = saved
    copy = _copy(path, str(tmp_path / "a"))
    config = _read_config(copy)
    edit(config)
    _rewrite(copy, config=config)
    fresh = untouched
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=message):
        adapters.load_adapter(fresh, copy)
    assert_unchanged(fresh, before)


def test_config_that_is_not_json(saved, untouched, tmp_path):
    _, _, path = saved
    copy = _copy(path, str(tmp_path / "a"))
    with open(os.path.join(copy, CONFIG), "w") as f:
        f.write('{"rank": 4,')
    with pytest.raises(ValueError, match="is not valid JSON"):
        adapters.load_adapter(untouched, copy)


def test_bad_arguments(saved, tmp_path):
    model, _, path = saved
    with pytest.raises(TypeError, match="expects the model returned by"):
        adapters.save_adapter(model.base_model, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        adapters.save_adapter(model, str(tmp_path / "x"), name="b")
    with pytest.raises(ValueError, match="adapter name must be"):
        adapters.load_adapter(model, path, name="a/b")


def test_fingerprint_tracks_every_nf4_byte(monkeypatch):
    model = qlora()
    layers = model.qlora_layers()
    first = fp.fingerprint(layers)
    assert first == fp.fingerprint(qlora().qlora_layers())
    packed = layers["mlp"].nf4_packed
    value = packed.numpy()
    value[-1] ^= 1
    packed.assign(value)
    second = fp.fingerprint(layers)
    assert second["sha256"] != first["sha256"]
    assert fp.differing_layers(first, second) == ["mlp"]
    # Above FULL_LIMIT an array is sampled: 64 chunks, first and last
    # included, so a change in the last chunk is still seen.
    monkeypatch.setattr(fp, "FULL_LIMIT", 16)
    monkeypatch.setattr(fp, "SAMPLE_BYTES", 8)
    sampled = fp.layer_digest(layers["mlp"])
    value[-1] ^= 1
    packed.assign(value)
    assert fp.layer_digest(layers["mlp"]) != sampled
