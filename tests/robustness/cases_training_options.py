"""Catalog cases (see catalog.py): `TrainingOptions` (`keras_qlora.training`).

Bad constructor arguments, `from_dict` mistakes, and options that do not
fit the model they are used on.
"""

import dataclasses

import numpy as np

import keras_qlora
from keras_qlora.training import TrainingOptions

from ._training_support import _float_model
from ._training_support import _values
from .catalog import Case
from .catalog import Refused

# -- TrainingOptions --------------------------------------------------------


def _options_check_model(tmp):
    TrainingOptions(offload_optimizer=True).check_model(has_lora=False)


def _options_frozen(tmp):
    TrainingOptions().bias = "all"


def _options_on_apply_without_lora(tmp):
    float_model = _float_model()
    before = _values(float_model.weights)
    try:
        keras_qlora.apply(
            float_model, target_modules=None, optimizer_8bit=True, verbose=False
        )
    finally:
        # Refused before editing: the float model is as it was.
        assert [type(x).__name__ for x in float_model.layers] == [
            "Dense",
            "Dense",
        ]
        for got, want in zip(_values(float_model.weights), before, strict=True):
            np.testing.assert_array_equal(got, want)


_OPTIONS = [
    ("bias not a mode", dict(bias="some"), ValueError, "bias='some'"),
    ("bias None", dict(bias=None), ValueError, "bias=None"),
    (
        "offload_optimizer a string",
        dict(offload_optimizer="yes"),
        TypeError,
        "offload_optimizer='yes'",
    ),
    (
        "optimizer_8bit an int",
        dict(optimizer_8bit=1),
        TypeError,
        "optimizer_8bit=1",
    ),
    (
        "gradient_checkpointing a number",
        dict(gradient_checkpointing=3),
        TypeError,
        "gradient_checkpointing=3",
    ),
    (
        "gradient_checkpointing an invalid regex",
        dict(gradient_checkpointing="block_["),
        ValueError,
        "gradient_checkpointing='block_['",
    ),
    (
        "gradient_checkpointing list holding a non-string",
        dict(gradient_checkpointing=["block_0", 3]),
        TypeError,
        "gradient_checkpointing=['block_0', 3]",
    ),
]

CASES = [
    Case(
        "TrainingOptions",
        name,
        lambda tmp, kw=kw: TrainingOptions(**kw),
        Refused(error, r"must be|Received", names=(named,)),
    )
    for name, kw, error, named in _OPTIONS
]
CASES += [
    Case(
        "TrainingOptions",
        "from_dict with an unknown key",
        lambda tmp: TrainingOptions.from_dict({"bias": "all", "rank": 4}),
        Refused(ValueError, r"Unknown training options", names=("rank",)),
    ),
    Case(
        "TrainingOptions",
        "from_dict given a string",
        lambda tmp: TrainingOptions.from_dict("bias"),
        Refused(TypeError, r"must be a dict", names=("'bias'",)),
    ),
    Case(
        "TrainingOptions",
        "from_dict with a bad value",
        lambda tmp: TrainingOptions.from_dict({"bias": "most"}),
        Refused(ValueError, r"bias must be one of", names=("'most'",)),
    ),
    Case(
        "TrainingOptions",
        "replace with an unknown field",
        lambda tmp: TrainingOptions().replace(rank=8),
        Refused(TypeError, r"unexpected keyword argument", names=("rank",)),
    ),
    Case(
        "TrainingOptions",
        "assigning a field after creation",
        _options_frozen,
        Refused(
            dataclasses.FrozenInstanceError,
            r"cannot assign to field",
            names=("bias",),
        ),
    ),
    Case(
        "TrainingOptions",
        "item lookup of an unknown option",
        lambda tmp: TrainingOptions()["rank"],
        Refused(KeyError, r"rank"),
    ),
    Case(
        "TrainingOptions",
        "check_model: offload without LoRA",
        _options_check_model,
        Refused(
            ValueError, r"needs LoRA adapters", names=("offload_optimizer",)
        ),
    ),
    Case(
        "TrainingOptions",
        "optimizer_8bit on apply() without LoRA",
        _options_on_apply_without_lora,
        Refused(ValueError, r"needs LoRA adapters", names=("optimizer_8bit",)),
    ),
]
