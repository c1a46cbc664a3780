"""Adapter checkpoints during `fit`, and resuming from the latest one.

`AdapterCheckpoint` writes, every epoch or every N steps, a directory
`<directory>/ckpt-<seq>` holding:
- `adapter/`: the active adapter, as `keras_qlora.save_adapter` writes it
  (LoRA + `modules_to_save` weights, config, base-model fingerprint);
- `optimizer.safetensors`: every `optimizer.variables` value, keyed by
  index (the slots, the iteration count, the learning rate);
- `trainer_state.json`: epochs completed, optimizer step, and each
  optimizer variable's index, name, shape and dtype.

Each checkpoint is assembled in a temporary directory and renamed into
place, so a run killed at any moment leaves only complete checkpoints
(plus an ignored `.ckpt-*.tmp-*` directory); the latest is the complete one
with the highest sequence number. `restore_checkpoint` reads it back and
returns the `initial_epoch` to pass to `fit`.

Example:
>>> model.compile(optimizer="adamw", loss="mse")
>>> ckpt = keras_qlora.training.AdapterCheckpoint("run1", keep=2)
>>> initial_epoch = 0
>>> if keras_qlora.training.latest_checkpoint("run1"):
...     initial_epoch = keras_qlora.training.restore_checkpoint(model, "run1")
>>> model.fit(x, y, epochs=10, initial_epoch=initial_epoch, callbacks=[ckpt])
"""

import json
import os
import re
import shutil
import warnings

import keras
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from keras_qlora import atomic
from keras_qlora.adapters import files as adapter_files
from keras_qlora.adapters import named
from keras_qlora.adapters.files import NonFiniteError

FORMAT = "keras_qlora.checkpoint"
FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_DIR = "adapter"
_NAME = re.compile(r"ckpt-(\d{6,})")
_ON_NON_FINITE = ("warn", "stop", "raise")


class AdapterCheckpoint(keras.callbacks.Callback):
    """Saves the adapter and optimizer state during `fit`, atomically.

    Args:
        directory: where the `ckpt-<seq>` directories go (created).
        save_freq: `"epoch"` (at the end of each epoch) or a positive int
            (every that many optimizer steps). Resuming is exact from
            epoch checkpoints; a mid-epoch checkpoint resumes at the start
            of its epoch, with that epoch's first updates already applied.
        keep: how many of the newest checkpoints to keep (older ones are
            deleted after a new one is complete), or None to keep all.
        on_non_finite: what to do when the adapter or optimizer state
            holds NaN or Inf (training diverged) at a save: such a state is
            never written (nothing could restore it) and the checkpoints
            already there are kept; `"warn"` warns and training goes on,
            `"stop"` warns and stops training (`model.stop_training`),
            `"raise"` raises `keras_qlora.adapters.NonFiniteError`.

    Raises:
        ValueError: a bad `save_freq`, `keep` or `on_non_finite`.
        TypeError: (when training starts) the model is not a `QLoRAModel`.
    """

    def __init__(
        self, directory, save_freq="epoch", keep=3, on_non_finite="warn"
    ):
        super().__init__()
        if on_non_finite not in _ON_NON_FINITE:
            raise ValueError(
                f"on_non_finite must be one of {_ON_NON_FINITE}. Received: "
                f"on_non_finite={on_non_finite!r}"
            )
        self.on_non_finite = on_non_finite
        if save_freq != "epoch" and (
            isinstance(save_freq, bool)
            or not isinstance(save_freq, int)
            or save_freq <= 0
        ):
            raise ValueError(
                "save_freq must be 'epoch' or a positive int (steps). "
                f"Received: save_freq={save_freq!r}"
            )
        _check_keep(keep)
        self.directory = _directory(directory, "AdapterCheckpoint")
        self.save_freq = save_freq
        self.keep = keep
        self._epoch = 0
        self._last_step = None
        self._seen = self._epoch_start = 0

    def on_train_begin(self, logs=None):
        named.lora_layers(self.model, "training.AdapterCheckpoint")
        atomic.make_dirs(self.directory)
        _remove_stale(self.directory)
        self._last_step = _step(self.model, self._seen)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = self._seen

    def on_train_batch_end(self, batch, logs=None):
        self._seen = self._epoch_start + batch + 1
        if self.save_freq == "epoch":
            return
        step = _step(self.model, self._seen)
        # steps_per_execution > 1 reports several steps at once.
        if step // self.save_freq > self._last_step // self.save_freq:
            self._save(epoch=self._epoch, complete=False, batch=batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._save(epoch=epoch + 1, complete=True, batch=None)

    def _save(self, epoch, complete, batch):
        step = _step(self.model, self._seen)
        extra = {"epoch_complete": complete, "batch": batch, "step": step}
        self._last_step = step
        try:
            save_checkpoint(
                self.model, self.directory, epoch, keep=self.keep, extra=extra
            )
        except NonFiniteError as err:
            if self.on_non_finite == "raise":
                raise
            warnings.warn(
                f"AdapterCheckpoint skipped the checkpoint of epoch {epoch} "
                f"(step {step}): {err}",
                RuntimeWarning,
                stacklevel=2,
            )
            if self.on_non_finite == "stop":
                self.model.stop_training = True


def save_checkpoint(model, directory, epoch: int, keep=None, extra=None):
    """Writes one checkpoint (see the module docstring); returns its path.

    Args:
        model: a compiled `QLoRAModel`.
        directory: the checkpoint directory (created).
        epoch: epochs completed; what `restore_checkpoint` returns.
        keep: prune to this many newest checkpoints after writing.
        extra: more JSON-serializable trainer state to record.

    Raises:
        TypeError: not a `QLoRAModel`, a non-int `epoch`, a `directory`
            that is not a path, or an `extra` that JSON cannot hold.
        ValueError: the model is not compiled; a negative `epoch`; a bad
            `keep`. All checked before anything is written or pruned.
        keras_qlora.adapters.NonFiniteError: the adapter or optimizer
            state holds NaN or Inf; nothing is written or pruned.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError(
            f"epoch must be a non-negative int. Received: epoch={epoch!r}"
        )
    if epoch < 0:
        raise ValueError(
            f"epoch must be a non-negative int. Received: epoch={epoch!r}"
        )
    _check_keep(keep)
    _check_extra(extra)
    optimizer = _optimizer(model, "save_checkpoint")
    directory = _directory(directory, "save_checkpoint")
    atomic.make_dirs(directory)
    values = [np.asarray(v.numpy()) for v in optimizer.variables]
    _refuse_non_finite(optimizer.variables, values)
    state = dict(
        extra or {},
        format=FORMAT,
        format_version=FORMAT_VERSION,
        epoch=epoch,
        adapter_name=named.active_adapter(model),
        optimizer=_describe(optimizer.variables, model),
    )
    seq = max((s for s, _ in _complete(directory)), default=0) + 1
    target = os.path.join(directory, f"ckpt-{seq:06d}")
    with atomic.staging_dir(target) as tmp:
        os.mkdir(os.path.join(tmp, ADAPTER_DIR))
        adapter_files.write_adapter(
            model, os.path.join(tmp, ADAPTER_DIR), state["adapter_name"]
        )
        tensors = {str(i): _storable(v) for i, v in enumerate(values)}
        atomic.write_bytes(
            os.path.join(tmp, OPTIMIZER_FILE), safetensors.numpy.save(tensors)
        )
        atomic.write_bytes(
            os.path.join(tmp, STATE_FILE),
            json.dumps(state, indent=2).encode(),
        )
        atomic.commit_dir(tmp, target)
    if keep is not None:
        for _, old in _complete(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(directory):
    """Path of the newest complete checkpoint in `directory`, or None."""
    found = _complete(_directory(directory, "latest_checkpoint"))
    return found[-1][1] if found else None


def restore_checkpoint(model, directory) -> int:
    """Restores LoRA, `modules_to_save` and optimizer state; returns the
    `initial_epoch` for `fit`.

    The model must be compiled, with the same `apply()` settings and base
    weights as the one that wrote the checkpoint. An optimizer not yet
    built is built on `model.trainable_variables`. Everything is read and
    checked before anything is assigned.

    Args:
        model: a compiled `QLoRAModel`.
        directory: the directory given to `AdapterCheckpoint`, or one
            `ckpt-<seq>` directory.

    Returns:
        Epochs completed when the checkpoint was written.

    Raises:
        FileNotFoundError: no complete checkpoint in `directory`.
        ValueError: the model is not compiled, or the checkpoint does not
            fit it (adapter or optimizer variables differ), or its files
            are corrupt.
    """
    directory = _directory(directory, "restore_checkpoint")
    path = directory
    if not _NAME.fullmatch(os.path.basename(directory)):
        path = latest_checkpoint(directory)
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(f"No complete checkpoint in {directory}")
    optimizer = _optimizer(model, "restore_checkpoint")
    state = _read_state(os.path.join(path, STATE_FILE))
    active = named.active_adapter(model)
    if state["adapter_name"] != active:
        raise ValueError(
            f"The checkpoint in {path} trained adapter "
            f"{state['adapter_name']!r} but the model's active adapter is "
            f"{active!r}. Add and activate that adapter (add_adapter, "
            "set_adapter) before restoring."
        )
    plan = adapter_files.prepare_load(
        model, os.path.join(path, ADAPTER_DIR), state["adapter_name"]
    )
    if not optimizer.variables or not getattr(optimizer, "built", True):
        optimizer.build(model.trainable_variables)
    values = _read_optimizer(path, state, optimizer.variables, model)
    plan.apply()
    for variable, value in zip(optimizer.variables, values, strict=True):
        variable.assign(value)
    return int(state["epoch"])


# -- private ---------------------------------------------------------------


def _directory(directory, caller):
    """`directory` as an absolute path; TypeError naming `caller`."""
    if not isinstance(directory, (str, bytes, os.PathLike)):
        raise TypeError(
            f"keras_qlora.training.{caller}(): directory must be a path (str "
            f"or os.PathLike). Received: directory={directory!r} of type "
            f"{type(directory).__name__}"
        )
    return os.path.abspath(os.fsdecode(directory))


def _check_keep(keep):
    # Checked before slicing: keep=0 would prune nothing, keep=-k the k oldest.
    if keep is not None and (
        isinstance(keep, bool) or not isinstance(keep, int) or keep <= 0
    ):
        raise ValueError(
            f"keep must be a positive int or None. Received: keep={keep!r}"
        )


def _check_extra(extra):
    if extra is None:
        return
    if not isinstance(extra, dict):
        raise TypeError(
            f"extra must be a dict of JSON values. Received: extra={extra!r}"
        )
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"extra must be a dict of JSON values (it goes to {STATE_FILE}): "
            f"{err}. Received: extra={extra!r}"[:400]
        ) from None


def _step(model, counted):
    """The optimizer's step count; `counted` (batches seen by the callback)
    for an optimizer wrapper without `iterations`."""
    iterations = getattr(model.optimizer, "iterations", None)
    return counted if iterations is None else int(np.asarray(iterations))


def _optimizer(model, caller):
    named.lora_layers(model, f"training.{caller}")
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            f"keras_qlora.training.{caller}(): model '{model.name}' is not "
            "compiled; call model.compile(optimizer=..., loss=...) first."
        )
    return optimizer


def _describe(variables, model):
    """Index, name, role, shape and dtype of each optimizer variable.

    Slot names embed the trained variable's path, which holds the model's
    auto-numbered name (`sequential_3/head/kernel`); the role replaces that
    path by the variable's position among `model.trainable_variables`, so
    it is the same for the same model built in another session.
    """
    paths = [v.path for v in model.trainable_variables]
    roles = _roles([v.name for v in variables], paths)
    return [
        {
            "index": i,
            "name": v.name,
            "role": role,
            "shape": [int(d) for d in v.shape],
            "dtype": keras.backend.standardize_dtype(v.dtype),
        }
        for i, (v, role) in enumerate(zip(variables, roles, strict=True))
    ]


def _roles(names, paths):
    """Each name with the longest trainable path in it made `<trainable i>`."""
    ordered = sorted(
        ((path.replace("/", "_"), i) for i, path in enumerate(paths)),
        key=lambda item: -len(item[0]),
    )

    def role(name):
        for path, i in ordered:
            if path in name:
                return name.replace(path, f"<trainable {i}>", 1)
        return name

    return [role(name) for name in names]


def _legacy_roles(variables, model):
    """The roles a checkpoint written before QLoRA variables kept their
    float layer's path holds.

    A QLoRA layer's variables were then `<layer name>/<variable>`
    (`query/lora_a` in every block), and so were the optimizer slots named
    after them: the roles are computed with those paths and names.
    """
    qlora = {
        id(v) for layer in model.qlora_layers().values() for v in layer.weights
    }
    paths, renames = [], []
    for v in model.trainable_variables:
        old = "/".join(v.path.split("/")[-2:]) if id(v) in qlora else v.path
        paths.append(old)
        if old != v.path:
            renames.append((v.path.replace("/", "_"), old.replace("/", "_")))
    renames.sort(key=lambda item: -len(item[0]))
    names = []
    for v in variables:
        name = v.name
        for new, old in renames:
            if new in name:
                name = name.replace(new, old, 1)
                break
        names.append(name)
    return _roles(names, paths)


def _refuse_non_finite(variables, values):
    for variable, value in zip(variables, values, strict=True):
        if value.dtype.kind == "f" or value.dtype.name == "bfloat16":
            bad = int(value.size - np.isfinite(value.astype("float32")).sum())
            if bad:
                raise NonFiniteError(
                    f"Optimizer variable '{variable.path}' holds {bad} NaN or "
                    "Inf values; training has diverged. No checkpoint was "
                    "written and none was pruned."
                )


def _storable(value):
    # numpy has no bfloat16; its bits travel as uint16.
    if value.dtype.name == "bfloat16":
        return np.require(value.view(np.uint16), requirements="C")
    return np.require(value, requirements="C")


def _complete(directory):
    """`[(seq, path)]` of complete checkpoints, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for entry in os.listdir(directory):
        match = _NAME.fullmatch(entry)
        if match and os.path.isdir(os.path.join(directory, entry)):
            found.append((int(match.group(1)), os.path.join(directory, entry)))
    return sorted(found)


def _remove_stale(directory):
    # Left by a run killed while writing; never a complete checkpoint.
    for entry in os.listdir(directory):
        if entry.startswith(".ckpt-") and atomic.TMP_MARK in entry:
            shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)


def _read_state(path):
    try:
        with open(path, "rb") as f:
            state = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"Checkpoint file missing: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    ok = (
        isinstance(state, dict)
        and state.get("format") == FORMAT
        and state.get("format_version") == FORMAT_VERSION
        and isinstance(state.get("epoch"), int)
        and not isinstance(state.get("epoch"), bool)
        and state["epoch"] >= 0
        and isinstance(state.get("adapter_name"), str)
        and isinstance(state.get("optimizer"), list)
    )
    if not ok:
        raise ValueError(
            f"{path} is not a keras_qlora checkpoint state (version "
            f"{FORMAT_VERSION}) with a non-negative int 'epoch', str "
            "'adapter_name' and an 'optimizer' list."
        )
    return state


def _read_optimizer(path, state, variables, model):
    """Saved optimizer values, checked against `variables` in order."""
    source = os.path.join(path, OPTIMIZER_FILE)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"Checkpoint file missing: {source}") from None
    try:
        tensors = safetensors.numpy.load(data)
    except safetensors.SafetensorError as err:
        raise ValueError(
            f"{source} is not a readable safetensors file ({err})."
        ) from None
    saved, current = state["optimizer"], _describe(variables, model)
    legacy = _legacy_roles(variables, model)
    if len(saved) != len(current) or len(tensors) != len(current):
        raise ValueError(
            f"The checkpoint's optimizer has {len(saved)} variables; this "
            f"model's optimizer has {len(current)}. Compile with the same "
            "optimizer and apply() settings."
        )
    values = []
    for want, got, old_role in zip(current, saved, legacy, strict=True):
        if not isinstance(got, dict):
            raise ValueError(
                f"{os.path.join(path, STATE_FILE)}: each 'optimizer' entry "
                f"must be an object. Received: {got!r}"
            )
        keys = ("index", "shape", "dtype")
        if any(got.get(k) != want[k] for k in keys) or got.get("role") not in (
            want["role"],
            old_role,
        ):
            raise ValueError(
                f"Optimizer variable {want['index']} differs: the checkpoint "
                f"has {got}, this optimizer has {want}."
            )
        value = tensors.get(str(want["index"]))
        stored = "uint16" if want["dtype"] == "bfloat16" else want["dtype"]
        if (
            value is None
            or list(value.shape) != want["shape"]
            or value.dtype.name != stored
        ):
            raise ValueError(
                f"{source}: tensor {want['index']} is missing or is not "
                f"{stored} of shape {want['shape']}."
            )
        if want["dtype"] == "bfloat16":
            value = value.view(ml_dtypes.bfloat16)
        _check_value(source, want, value)
        values.append(value)
    return values


def _check_value(source, want, value):
    """Refuses optimizer state no run could have written: NaN/Inf moments,
    a negative step count or learning rate."""
    name = want["name"]
    if value.dtype.kind == "f" or value.dtype.name == "bfloat16":
        as_float = value.astype("float32")
        if not np.isfinite(as_float).all():
            raise ValueError(
                f"{source}: optimizer variable {want['index']} ('{name}') "
                "holds NaN or Inf values."
            )
        if name == "learning_rate" and (as_float < 0).any():
            raise ValueError(
                f"{source}: the learning rate must be >= 0. Received: "
                f"{as_float.tolist()}"
            )
    if name in ("iteration", "iterations") and (value < 0).any():
        raise ValueError(
            f"{source}: the optimizer step count must be >= 0. Received: "
            f"{value.tolist()}"
        )
