"""Catalog cases (see catalog.py): training checkpoints.

The `AdapterCheckpoint` callback and `save_checkpoint` /
`latest_checkpoint` / `restore_checkpoint` of `keras_qlora.training`: bad
arguments, non-finite weights, names already taken, and failed writes that
must leave the previous good files byte-identical (`files_kept`).

Models are a Sequential of two small Dense layers (8 -> 16 -> 4) with LoRA
on "q".
"""

import warnings

import numpy as np

from keras_qlora import training
from keras_qlora.adapters import NonFiniteError
from keras_qlora.training import AdapterCheckpoint

from ._training_support import _compiled
from ._training_support import _fit
from ._training_support import _float_model
from ._training_support import _qlora
from ._training_support import _values
from .catalog import Case
from .catalog import Correct
from .catalog import Refused
from .catalog import files_kept


def _good_checkpoint(tmp, **kw):
    """A model trained one epoch with one good checkpoint in tmp/run."""
    model = _compiled()
    _fit(model, callbacks=[AdapterCheckpoint(tmp / "run", **kw)])
    return model, tmp / "run"


def _warns(match, run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    texts = [str(w.message) for w in caught]
    assert any(match in t for t in texts), f"no warning {match!r}: {texts}"
    return result


# -- AdapterCheckpoint ------------------------------------------------------


def _fit_into(directory, model=None, **kw):
    def run(tmp):
        m = _compiled() if model is None else model()
        _fit(m, callbacks=[AdapterCheckpoint(directory(tmp), **kw)])

    return run


def _nan_fit(on_non_finite):
    def run(tmp):
        model, run_dir = _good_checkpoint(tmp, keep=1)
        checkpoint = AdapterCheckpoint(
            run_dir, keep=1, on_non_finite=on_non_finite
        )
        with files_kept(run_dir):
            history = _warns(
                "skipped the checkpoint",
                lambda: _fit(model, 3, nan=True, callbacks=[checkpoint]),
            )
        losses = history.history["loss"]
        assert np.isnan(losses).all(), losses
        # "warn" trains on, "stop" stops after the first bad epoch.
        assert len(losses) == (3 if on_non_finite == "warn" else 1), losses
        # The good checkpoint brings the diverged model back.
        assert training.restore_checkpoint(model, run_dir) == 1
        for value in _values(model.trainable_variables):
            assert np.isfinite(value).all()

    return run


def _nan_fit_raise(tmp):
    model, run_dir = _good_checkpoint(tmp)
    checkpoint = AdapterCheckpoint(run_dir, on_non_finite="raise")
    with files_kept(run_dir):
        _fit(model, 2, nan=True, callbacks=[checkpoint])


def _next_name_taken(tmp):
    model, run_dir = _good_checkpoint(tmp)
    (run_dir / "ckpt-000002").write_bytes(b"a file the user put there")
    with files_kept(run_dir):
        _fit(model, callbacks=[AdapterCheckpoint(run_dir)])


def _file(tmp):
    path = tmp / "file"
    path.write_bytes(b"x")
    return path


_KEEP = [
    ("keep zero", 0),
    ("keep negative", -1),
    ("keep a float", 2.5),
    ("keep True", True),
    ("keep a string", "3"),
]
CASES = [
    Case(
        "AdapterCheckpoint",
        name,
        lambda tmp, keep=keep: AdapterCheckpoint(tmp / "run", keep=keep),
        Refused(
            ValueError, r"keep must be a positive int", names=(f"{keep!r}",)
        ),
    )
    for name, keep in _KEEP
]
CASES += [
    Case(
        "AdapterCheckpoint",
        f"on_non_finite {value!r}",
        lambda tmp, value=value: AdapterCheckpoint(
            tmp / "run", on_non_finite=value
        ),
        Refused(
            ValueError,
            r"on_non_finite must be one of",
            names=(f"on_non_finite={value!r}",),
        ),
    )
    for value in ("ignore", None, "WARN")
]
CASES += [
    Case(
        "AdapterCheckpoint",
        f"save_freq {value!r}",
        lambda tmp, value=value: AdapterCheckpoint(
            tmp / "run", save_freq=value
        ),
        Refused(
            ValueError,
            r"save_freq must be 'epoch' or a positive int",
            names=(f"save_freq={value!r}",),
        ),
    )
    for value in (0, "batch", 2.5)
]
CASES += [
    Case(
        "AdapterCheckpoint",
        "directory None",
        lambda tmp: AdapterCheckpoint(None),
        Refused(TypeError, r"must be a path", names=("directory=None",)),
    ),
    Case(
        "AdapterCheckpoint",
        "directory is a file",
        _fit_into(_file),
        Refused(NotADirectoryError, r"is a file", names=("{tmp}/file",)),
    ),
    Case(
        "AdapterCheckpoint",
        "directory below a file",
        _fit_into(lambda tmp: _file(tmp) / "run"),
        Refused(NotADirectoryError, r"is a file", names=("{tmp}/file",)),
    ),
    Case(
        "AdapterCheckpoint",
        "fit of a plain Keras model",
        _fit_into(
            lambda tmp: tmp / "run",
            model=lambda: _plain_compiled(),
        ),
        Refused(
            TypeError, r"expects the model returned by", names=("Sequential",)
        ),
    ),
    Case(
        "AdapterCheckpoint",
        "fit of a model without LoRA",
        _fit_into(
            lambda tmp: tmp / "run",
            model=lambda: _compiled(target_modules=None),
        ),
        Refused(
            ValueError, r"has no LoRA layers", names=("AdapterCheckpoint",)
        ),
    ),
    Case(
        "AdapterCheckpoint",
        "NaN losses, on_non_finite='warn'",
        _nan_fit("warn"),
        Correct(),
    ),
    Case(
        "AdapterCheckpoint",
        "NaN losses, on_non_finite='stop'",
        _nan_fit("stop"),
        Correct(),
    ),
    Case(
        "AdapterCheckpoint",
        "NaN losses, on_non_finite='raise'",
        _nan_fit_raise,
        Refused(
            NonFiniteError,
            r"NaN or Inf values; training has diverged",
            names=("lora_a_momentum",),
        ),
    ),
    Case(
        "AdapterCheckpoint",
        "next checkpoint name taken by a file",
        _next_name_taken,
        Refused(FileExistsError, r"already exists", names=("ckpt-000002",)),
    ),
]


def _plain_compiled():
    model = _float_model()
    model.compile(optimizer="adam", loss="mse")
    return model


# -- save_checkpoint / latest_checkpoint / restore_checkpoint ---------------


def _save_after_good(**kw):
    def run(tmp):
        model, run_dir = _good_checkpoint(tmp)
        _fit(model, callbacks=[AdapterCheckpoint(tmp / "other")])
        with files_kept(run_dir):
            training.save_checkpoint(model, run_dir, **kw)

    return run


def _save(model, directory=None, **kw):
    def run(tmp):
        target = tmp / "run" if directory is None else directory(tmp)
        training.save_checkpoint(model(), target, **kw)

    return run


CASES += [
    Case(
        "save_checkpoint",
        "epoch negative",
        _save(_compiled, epoch=-1),
        Refused(ValueError, r"non-negative int", names=("epoch=-1",)),
    ),
    Case(
        "save_checkpoint",
        "keep negative (pruned the oldest before)",
        _save_after_good(epoch=2, keep=-1),
        Refused(ValueError, r"keep must be a positive int", names=("keep=-1",)),
    ),
    Case(
        "save_checkpoint",
        "keep zero",
        _save_after_good(epoch=2, keep=0),
        Refused(ValueError, r"keep must be a positive int", names=("keep=0",)),
    ),
    Case(
        "save_checkpoint",
        "extra not JSON",
        _save_after_good(epoch=2, extra={"started": object()}),
        Refused(TypeError, r"dict of JSON values", names=("extra",)),
    ),
    Case(
        "save_checkpoint",
        "extra not a dict",
        _save_after_good(epoch=2, extra=["step", 3]),
        Refused(
            TypeError, r"dict of JSON values", names=("extra=['step', 3]",)
        ),
    ),
    Case(
        "save_checkpoint",
        "model not compiled",
        _save(_qlora, epoch=0),
        Refused(ValueError, r"is not compiled", names=("save_checkpoint",)),
    ),
    Case(
        "save_checkpoint",
        "a plain Keras model",
        _save(_plain_compiled, epoch=0),
        Refused(
            TypeError, r"expects the model returned by", names=("Sequential",)
        ),
    ),
    Case(
        "save_checkpoint",
        "directory None",
        _save(_compiled, directory=lambda tmp: None, epoch=0),
        Refused(TypeError, r"must be a path", names=("directory=None",)),
    ),
    Case(
        "latest_checkpoint",
        "directory None",
        lambda tmp: training.latest_checkpoint(None),
        Refused(TypeError, r"must be a path", names=("latest_checkpoint",)),
    ),
    Case(
        "latest_checkpoint",
        "directory is a file",
        lambda tmp: _is_none(training.latest_checkpoint(_file(tmp))),
        Correct(),
    ),
    Case(
        "restore_checkpoint",
        "directory not a path (training group)",
        lambda tmp: training.restore_checkpoint(_compiled(), 3),
        Refused(TypeError, r"must be a path", names=("directory=3",)),
    ),
]


def _is_none(value):
    assert value is None, value
