"""Catalog cases (see catalog.py): gradient checkpointing.

`enable_gradient_checkpointing`, its `apply()` option,
`disable_gradient_checkpointing` and `checkpointed_layers`. One case uses a
two-block keras_hub BERT of hidden size 16.
"""

import keras
import numpy as np

import keras_qlora
from keras_qlora import training

from ._training_support import _fit
from ._training_support import _float_model
from ._training_support import _qlora
from ._training_support import _values
from .catalog import Case
from .catalog import Correct
from .catalog import Refused

# -- gradient checkpointing -------------------------------------------------


def _enable_twice_on_bert(tmp):
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    first = training.enable_gradient_checkpointing(backbone)
    second = training.enable_gradient_checkpointing(backbone)
    assert first == second == ["transformer_layer_0", "transformer_layer_1"]
    # One wrapper each: one disable restores the class's own call.
    assert training.disable_gradient_checkpointing(backbone) == first
    block = backbone.transformer_layers[0]
    assert "call" not in vars(block), "wrapped twice"
    assert training.disable_gradient_checkpointing(backbone) == []


def _remat_scope(tmp):
    with keras.RematScope(mode="full"):
        model = _float_model()
    training.enable_gradient_checkpointing(model, ["q"])


CASES = [
    Case(
        "enable_gradient_checkpointing",
        "model without transformer blocks",
        lambda tmp: training.enable_gradient_checkpointing(_float_model()),
        Refused(
            ValueError,
            r"No transformer blocks recognized",
            names=("q (Dense)", "blocks="),
        ),
    ),
    Case(
        "enable_gradient_checkpointing",
        "not a model",
        lambda tmp: training.enable_gradient_checkpointing("model.keras"),
        Refused(TypeError, r"expects a Keras model or layer", names=("str",)),
    ),
    Case(
        "enable_gradient_checkpointing",
        "blocks=False",
        lambda tmp: training.enable_gradient_checkpointing(
            _float_model(), False
        ),
        Refused(
            ValueError,
            r"disable_gradient_checkpointing",
            names=("blocks=False",),
        ),
    ),
    Case(
        "enable_gradient_checkpointing",
        "blocks a number",
        lambda tmp: training.enable_gradient_checkpointing(_float_model(), 3),
        Refused(TypeError, r"blocks must be", names=("blocks=3",)),
    ),
    Case(
        "enable_gradient_checkpointing",
        "blocks matching nothing",
        lambda tmp: training.enable_gradient_checkpointing(
            _float_model(), ["block_0"]
        ),
        Refused(ValueError, r"matched no layer", names=("'block_0'", "q")),
    ),
    Case(
        "enable_gradient_checkpointing",
        "blocks an invalid regex",
        lambda tmp: training.enable_gradient_checkpointing(
            _float_model(), "block_["
        ),
        Refused(
            ValueError, r"not a valid regular expression", names=("block_[",)
        ),
    ),
    Case(
        "enable_gradient_checkpointing",
        "layers made under keras.RematScope",
        _remat_scope,
        Refused(ValueError, r"RematScope", names=("'q'",)),
    ),
    Case(
        "enable_gradient_checkpointing",
        "twice on a keras_hub backbone",
        _enable_twice_on_bert,
        Correct(),
    ),
    Case(
        "disable_gradient_checkpointing",
        "not a model",
        lambda tmp: training.disable_gradient_checkpointing(3),
        Refused(TypeError, r"expects a Keras model or layer", names=("int",)),
    ),
    Case(
        "disable_gradient_checkpointing",
        "never enabled",
        lambda tmp: _is_empty(
            training.disable_gradient_checkpointing(_float_model())
        ),
        Correct(),
    ),
    Case(
        "checkpointed_layers",
        "not a model",
        lambda tmp: training.checkpointed_layers([1]),
        Refused(TypeError, r"expects a Keras model or layer", names=("list",)),
    ),
]


def _is_empty(value):
    assert value == [], value


def _apply_gc_no_blocks(tmp):
    float_model = _float_model()
    try:
        keras_qlora.apply(
            float_model,
            target_modules=["q"],
            gradient_checkpointing=True,
            verbose=False,
        )
    finally:
        # Refused before the model was quantized.
        assert type(float_model.get_layer("q")).__name__ == "Dense"


def _apply_gc_then_enable(tmp):
    model = _qlora(gradient_checkpointing=["q"])
    assert training.enable_gradient_checkpointing(model, ["q"]) == ["q"]
    assert training.checkpointed_layers(model) == ["q"]
    model.compile(optimizer="adam", loss="mse")
    before = _values(model.trainable_variables)
    loss = _fit(model, epochs=2).history["loss"]
    assert np.isfinite(loss).all(), loss
    after = _values(model.trainable_variables)
    assert any(
        not np.array_equal(a, b) for a, b in zip(after, before, strict=True)
    )


def _apply_gc_then_disable(tmp):
    model = _qlora(gradient_checkpointing=["q"])
    assert training.disable_gradient_checkpointing(model) == ["q"]
    path = tmp / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    # The saved model is the model as it is now, not as apply() made it.
    assert training.checkpointed_layers(reloaded) == []
    assert reloaded.get_config()["training"]["gradient_checkpointing"] is False


CASES += [
    Case(
        "apply(gradient_checkpointing=)",
        "True on a model without blocks",
        _apply_gc_no_blocks,
        Refused(ValueError, r"No transformer blocks recognized", names=("q",)),
    ),
    Case(
        "apply(gradient_checkpointing=)",
        "an invalid regex",
        lambda tmp: _qlora(gradient_checkpointing="q["),
        Refused(
            ValueError,
            r"not a valid regular expression",
            names=("gradient_checkpointing='q['",),
        ),
    ),
    Case(
        "apply(gradient_checkpointing=)",
        "names matching no layer",
        lambda tmp: _qlora(gradient_checkpointing=["block_0"]),
        Refused(ValueError, r"matched no layer", names=("'block_0'",)),
    ),
    Case(
        "apply(gradient_checkpointing=)",
        "then enable_gradient_checkpointing again, and fit",
        _apply_gc_then_enable,
        Correct(),
    ),
    Case(
        "apply(gradient_checkpointing=)",
        "then disabled, saved and reloaded",
        _apply_gc_then_disable,
        Correct(),
    ),
]
