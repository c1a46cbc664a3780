"""AdapterCheckpoint / restore_checkpoint: a killed run resumes with the
same losses; interrupted writes never replace the latest checkpoint."""

import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_qlora
from keras_qlora import adapters
from keras_qlora.training import checkpoint
from keras_qlora.training.checkpoint import AdapterCheckpoint
from keras_qlora.training.checkpoint import latest_checkpoint
from keras_qlora.training.checkpoint import restore_checkpoint

EPOCHS, BATCH, N = 3, 32, 256  # 8 steps per epoch
KILL_AT = (2, 3)  # (epoch index, batch): during epoch 3


def data():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, 24)).astype("float32")
    w = rng.standard_normal((24, 4)).astype("float32")
    return x, np.tanh(x @ w)


def build(optimizer="adamw"):
    """A compiled QLoRA model whose every value comes from numpy seeds, so
    that separate processes build the same model."""
    model = keras.Sequential(
        [
            keras.Input((24,)),
            keras.layers.Dense(32, activation="gelu", name="query"),
            keras.layers.Dense(32, activation="gelu", name="mlp"),
            keras.layers.Dense(16, name="value"),
            keras.layers.Dense(4, name="head"),
        ]
    )
    rng = np.random.default_rng(0)
    for variable in model.weights:
        variable.assign(rng.standard_normal(variable.shape) * 0.3)
    model = keras_qlora.apply(
        model, rank=4, modules_to_save=["head"], verbose=False
    )
    for layer in model.qlora_layers(lora_only=True).values():
        layer.lora_a.assign(rng.standard_normal(layer.lora_a.shape) * 0.2)
    if optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(5e-3)
    model.compile(optimizer=optimizer, loss="mse")
    return model


def trained_values(model):
    return [v.numpy() for v in model.trainable_variables]


def fit(model, callbacks=(), initial_epoch=0, epochs=EPOCHS):
    x, y = data()
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )
    return history.history["loss"]


class _KillDuringEpoch(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)


def worker(mode, directory, out):
    """Run in a subprocess: 'killed' trains and dies in epoch 3; 'resume'
    restores and finishes."""
    model = build()
    if mode == "killed":
        fit(model, [AdapterCheckpoint(directory), _KillDuringEpoch()])
        raise SystemExit("the run was not killed")
    initial_epoch = restore_checkpoint(model, directory)
    iterations = int(model.optimizer.iterations.numpy())
    losses = fit(model, initial_epoch=initial_epoch)
    np.savez(out, *trained_values(model))
    with open(out + ".json", "w") as f:
        json.dump(dict(initial=initial_epoch, it=iterations, loss=losses), f)


def _run_worker(mode, directory, out):
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import test_checkpoint; "
        f"test_checkpoint.worker({mode!r}, {directory!r}, {out!r})"
    )
    root = os.path.dirname(os.path.dirname(here))
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_killed_run_resumes_with_the_same_losses(tmp_path):
    directory, out = str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    killed = _run_worker("killed", directory, out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    names = sorted(os.listdir(directory))
    assert names == ["ckpt-000001", "ckpt-000002"], names
    with open(os.path.join(directory, names[-1], "trainer_state.json")) as f:
        state = json.load(f)
    assert state["epoch"] == 2 and state["step"] == 16
    resumed = _run_worker("resume", directory, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(out + ".json") as f:
        result = json.load(f)
    assert result["initial"] == 2 and result["it"] == 16

    model = build()  # the uninterrupted run, in this process
    losses = fit(model)
    assert losses[2] < losses[0]
    np.testing.assert_allclose(result["loss"], losses[2:], rtol=1e-5)
    with np.load(out + ".npz") as saved:
        final = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    expected = trained_values(model)
    assert len(final) == len(expected) == 6  # 2 LoRA pairs + head
    for got, want in zip(final, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    directory = str(tmp_path / "ckpt")
    model = build()
    fit(model, [AdapterCheckpoint(directory)], epochs=1)
    after_one = trained_values(model)
    slots_one = [v.numpy() for v in model.optimizer.variables]

    def failing_replace(src, dst):
        raise OSError("killed during rename (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        fit(model, [AdapterCheckpoint(directory)], initial_epoch=1, epochs=2)
    monkeypatch.undo()
    assert sorted(os.listdir(directory)) == ["ckpt-000001"]  # no temp dir
    fresh = build()
    assert restore_checkpoint(fresh, directory) == 1
    for got, want in zip(trained_values(fresh), after_one, strict=True):
        np.testing.assert_array_equal(got, want)
    restored = [v.numpy() for v in fresh.optimizer.variables]
    assert len(restored) == len(slots_one) == 2 + 2 * 6
    for got, want in zip(restored, slots_one, strict=True):
        np.testing.assert_array_equal(got, want)


def test_step_checkpoints_and_keep(tmp_path):
    directory = str(tmp_path / "ckpt")
    model = build()
    fit(model, [AdapterCheckpoint(directory, save_freq=3, keep=2)], epochs=2)
    # Steps 3, 6, 9, 12, 15 were saved; the two newest are kept.
    assert sorted(os.listdir(directory)) == ["ckpt-000004", "ckpt-000005"]
    path = latest_checkpoint(directory)
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    assert state["step"] == 15 and state["epoch"] == 1
    assert state["epoch_complete"] is False and state["batch"] == 7
    assert restore_checkpoint(build(), directory) == 1


def test_restore_checks_before_assigning(tmp_path):
    directory = str(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        restore_checkpoint(build(), directory)
    model = build()
    fit(model, [AdapterCheckpoint(directory)], epochs=1)
    uncompiled = keras_qlora.apply(
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="q")]),
        rank=2,
        target_modules=["q"],
        verbose=False,
    )
    with pytest.raises(ValueError, match="is not compiled"):
        restore_checkpoint(uncompiled, directory)
    switched = build()
    adapters.add_adapter(switched, "b")
    adapters.set_adapter(switched, "b")
    with pytest.raises(ValueError, match="trained adapter 'default' but"):
        restore_checkpoint(switched, directory)
    other = build(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    before = trained_values(other)
    with pytest.raises(ValueError, match="optimizer has 14 variables.*has 8"):
        restore_checkpoint(other, directory)
    for got, want in zip(trained_values(other), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_bad_arguments():
    with pytest.raises(ValueError, match="save_freq must be 'epoch' or a"):
        AdapterCheckpoint("d", save_freq="batch")
    with pytest.raises(ValueError, match="keep must be a positive int"):
        AdapterCheckpoint("d", keep=0)
    with pytest.raises(TypeError, match="epoch must be a non-negative int"):
        checkpoint.save_checkpoint(build(), "d", epoch=1.5)
