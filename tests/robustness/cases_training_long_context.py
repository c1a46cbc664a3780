"""Catalog cases (see catalog.py): the long-sequence options of `apply()`
and `from_preset()`, `attention_chunk_size` and `lm_loss_chunk_size`.

Bad sizes, models they do not apply to, a compiled loss the chunked LM
loss cannot reproduce, and attention dropout in training.
"""

import keras_hub
import numpy as np

import keras_qlora
from keras_qlora.training import TrainingOptions

from ._training_support import _float_model
from .catalog import Case
from .catalog import Refused

_SIZES = [
    ("zero", 0, ValueError, "=0"),
    ("negative", -8, ValueError, "=-8"),
    ("a float", 8.0, TypeError, "=8.0"),
    ("a bool", True, TypeError, "=True"),
    ("a string", "512", TypeError, "='512'"),
]


def _tiny_gpt2(dropout=0.0):
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
        dropout=dropout,
    )


def _gpt2_inputs():
    return {
        "token_ids": np.ones((1, 20), "int32"),
        "padding_mask": np.ones((1, 20), "int32"),
    }


def _dropout_in_training(tmp):
    model = keras_qlora.apply(
        _tiny_gpt2(dropout=0.1), attention_chunk_size=8, verbose=False
    )
    model(_gpt2_inputs(), training=True)


def _wrong_compiled_loss(tmp):
    task = keras_hub.models.GPT2CausalLM(
        backbone=_tiny_gpt2(), preprocessor=None
    )
    model = keras_qlora.apply(task, lm_loss_chunk_size=8, verbose=False)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x = _gpt2_inputs()
    model.fit(x, x["token_ids"], verbose=0)


CASES = []
for key in ("attention_chunk_size", "lm_loss_chunk_size"):
    for name, value, error, shown in _SIZES:
        CASES.append(
            Case(
                "TrainingOptions",
                f"{key} {name}",
                lambda tmp, kw={key: value}: TrainingOptions(**kw),
                Refused(error, r"must be a positive int", names=(key + shown,)),
            )
        )
        CASES.append(
            Case(
                "apply",
                f"{key} {name}",
                lambda tmp, kw={key: value}: keras_qlora.apply(
                    _float_model(), verbose=False, **kw
                ),
                Refused(error, r"must be a positive int", names=(key + shown,)),
            )
        )
CASES += [
    Case(
        "from_preset",
        "attention_chunk_size zero (refused before the preset is read)",
        lambda tmp: keras_qlora.from_preset(
            keras_hub.models.LlamaBackbone, str(tmp), attention_chunk_size=0
        ),
        Refused(
            ValueError,
            r"must be a positive int",
            names=("attention_chunk_size=0",),
        ),
    ),
    Case(
        "apply",
        "attention_chunk_size on a model without attention layers",
        lambda tmp: keras_qlora.apply(
            _float_model(),
            target_modules=["q"],
            attention_chunk_size=8,
            verbose=False,
        ),
        Refused(
            ValueError,
            r"no attention layer",
            names=("attention_chunk_size", "float_net"),
        ),
    ),
    Case(
        "apply",
        "lm_loss_chunk_size on a backbone (not a CausalLM)",
        lambda tmp: keras_qlora.apply(
            _tiny_gpt2(), lm_loss_chunk_size=8, verbose=False
        ),
        Refused(
            ValueError,
            r"is not a keras_hub CausalLM",
            names=("lm_loss_chunk_size",),
        ),
    ),
    Case(
        "QLoRAModel.__call__",
        "attention_chunk_size with attention dropout in training",
        _dropout_in_training,
        Refused(
            ValueError,
            r"does not reproduce",
            names=("attention_chunk_size", "self_attention", "dropout=0.1"),
        ),
    ),
    Case(
        "QLoRAModel.fit",
        "lm_loss_chunk_size with a loss on probabilities",
        _wrong_compiled_loss,
        Refused(ValueError, r"from_logits=True", names=("lm_loss_chunk_size",)),
    ),
]
