"""Catalog cases (see catalog.py): training checkpoints, `save_checkpoint`,
`latest_checkpoint` and `restore_checkpoint`.

Missing, edited and non-finite state and optimizer tensors, mismatched
models, and failed writes that must leave the previous good files
byte-identical (`files_kept`).
"""

import json
import os
import shutil

import numpy as np

from ._files_support import _edit_tensors
from ._files_support import _fill
from ._files_support import _float_model
from ._files_support import _kept_file
from ._files_support import _lora
from ._files_support import _model
from ._files_support import _poison
from ._files_support import _randomize
from ._files_support import _refused_unchanged
from ._files_support import _write_file
from .catalog import Case
from .catalog import Correct
from .catalog import Refused
from .catalog import files_kept

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


CASES = CKPT_CASES
