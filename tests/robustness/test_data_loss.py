"""A diverged run never costs the user a good adapter or checkpoint, and a
damaged checkpoint is refused, not restored."""

import hashlib
import json
import os
import sys

import numpy as np
import pytest
import safetensors.numpy

import keras_qlora
from keras_qlora.adapters import NonFiniteError
from keras_qlora.training.checkpoint import AdapterCheckpoint
from keras_qlora.training.checkpoint import latest_checkpoint
from keras_qlora.training.checkpoint import restore_checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "training"))
import test_checkpoint as ckpt_helpers  # noqa: E402


def _tree_digest(directory):
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


def _fit(model, callbacks, epochs, poison=False):
    x, y = ckpt_helpers.data()
    if poison:
        x = np.full_like(x, np.nan)
    return model.fit(
        x,
        y,
        batch_size=ckpt_helpers.BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )


def _poison_lora(model):
    layer = next(iter(model.qlora_layers(lora_only=True).values()))
    value = layer.lora_b.numpy()
    value[0, 0] = np.nan
    layer.lora_b.assign(value)


@pytest.mark.parametrize("keep", [1, 3])
def test_nan_epochs_never_prune_the_good_checkpoints(tmp_path, keep):
    directory = str(tmp_path / "run")
    model = ckpt_helpers.build()
    _fit(model, [AdapterCheckpoint(directory, keep=keep)], epochs=2)
    good = latest_checkpoint(directory)
    digest = _tree_digest(directory)
    with pytest.warns(RuntimeWarning, match="skipped the checkpoint"):
        _fit(
            model,
            [AdapterCheckpoint(directory, keep=keep)],
            epochs=3,
            poison=True,
        )
    assert latest_checkpoint(directory) == good
    assert _tree_digest(directory) == digest
    assert restore_checkpoint(ckpt_helpers.build(), directory) == 2


def test_non_finite_state_can_stop_or_raise(tmp_path):
    model = ckpt_helpers.build()
    stop = AdapterCheckpoint(str(tmp_path / "a"), on_non_finite="stop")
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        history = _fit(model, [stop], epochs=3, poison=True)
    assert len(history.history["loss"]) == 1
    model = ckpt_helpers.build()
    strict = AdapterCheckpoint(str(tmp_path / "b"), on_non_finite="raise")
    with pytest.raises(NonFiniteError, match="training has diverged"):
        _fit(model, [strict], epochs=1, poison=True)
    assert latest_checkpoint(str(tmp_path / "b")) is None
    with pytest.raises(ValueError, match="on_non_finite must be one of"):
        AdapterCheckpoint("d", on_non_finite="ignore")


def test_save_adapter_refuses_nan_and_keeps_the_old_adapter(tmp_path):
    model = ckpt_helpers.build()
    path = str(tmp_path / "adapter")
    keras_qlora.save_adapter(model, path)
    digest = _tree_digest(path)
    _poison_lora(model)
    with pytest.raises(NonFiniteError, match=r"'query/lora_b' \(1\)"):
        keras_qlora.save_adapter(model, path, overwrite=True)
    assert _tree_digest(path) == digest
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging left


def test_adapter_values_are_checked_after_the_cast(tmp_path):
    model = ckpt_helpers.build()
    path = str(tmp_path / "adapter")
    keras_qlora.save_adapter(model, path)
    weights = os.path.join(path, "adapter_model.safetensors")
    tensors = safetensors.numpy.load_file(weights)
    tensors = {k: v.astype("float64") for k, v in tensors.items()}
    tensors["query/lora_b"][0, 0] = 1e300  # finite in float64, inf in f32
    data = safetensors.numpy.save(tensors)
    with open(weights, "wb") as f:
        f.write(data)
    config_path = os.path.join(path, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["weights_sha256"] = hashlib.sha256(data).hexdigest()
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"'query/lora_b' holds NaN or Inf"):
        keras_qlora.load_adapter(model, path)


def _edit_checkpoint(directory, edit_state=None, edit_tensor=None):
    path = latest_checkpoint(directory)
    state_path = os.path.join(path, "trainer_state.json")
    with open(state_path) as f:
        state = json.load(f)
    if edit_state:
        edit_state(state)
        with open(state_path, "w") as f:
            json.dump(state, f)
    if edit_tensor:
        opt = os.path.join(path, "optimizer.safetensors")
        tensors = safetensors.numpy.load_file(opt)
        names = {e["name"]: str(e["index"]) for e in state["optimizer"]}
        edit_tensor(tensors, names)
        safetensors.numpy.save_file(tensors, opt)


def _set(name, value):
    def edit(tensors, names):
        key = names[name]
        tensors[key] = np.full_like(tensors[key], value)

    return edit


def _nan_moment(tensors, names):
    key = next(v for k, v in names.items() if "momentum" in k)
    tensors[key] = np.full_like(tensors[key], np.nan)


@pytest.mark.parametrize(
    "edit_state, edit_tensor, match",
    [
        (lambda s: s.update(epoch=-5), None, "non-negative int 'epoch'"),
        (lambda s: s["optimizer"].__setitem__(0, 3), None, "must be an obj"),
        (None, _nan_moment, "holds NaN or Inf"),
        (None, _set("iteration", -100), "step count must be >= 0"),
        (None, _set("learning_rate", np.inf), "holds NaN or Inf"),
        (None, _set("learning_rate", -1.0), "learning rate must be >= 0"),
    ],
    ids=["epoch", "entry-type", "nan-moment", "iterations", "lr-inf", "lr-neg"],
)
def test_damaged_checkpoints_are_refused(
    tmp_path, edit_state, edit_tensor, match
):
    directory = str(tmp_path / "run")
    model = ckpt_helpers.build()
    _fit(model, [AdapterCheckpoint(directory)], epochs=1)
    _edit_checkpoint(directory, edit_state, edit_tensor)
    fresh = ckpt_helpers.build()
    before = [v.numpy() for v in fresh.trainable_variables]
    with pytest.raises(ValueError, match=match):
        restore_checkpoint(fresh, directory)
    for got, want in zip(fresh.trainable_variables, before, strict=True):
        np.testing.assert_array_equal(got.numpy(), want)
