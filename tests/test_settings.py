"""`QLoRASettings` and `TrainingOptions`: validated once, carried whole."""

import dataclasses

import keras
import numpy as np
import pytest

import keras_qlora
from keras_qlora.settings import QLoRASettings
from keras_qlora.training import TrainingOptions


def _model():
    return keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(16, name="query"),
            keras.layers.Dense(8, name="out"),
        ]
    )


# -- QLoRASettings ------------------------------------------------------------


def test_defaults_match_apply():
    assert QLoRASettings().to_dict() == {
        "rank": 8,
        "alpha": 16.0,
        "dropout": 0.0,
        "use_rslora": False,
        "block_size": 64,
        "double_quant": True,
        "scale_search": True,
        "quant_type": "nf4",
    }


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rank": 0}, ValueError, r"rank must be a positive int.*rank=0"),
        ({"rank": -3}, ValueError, r"rank must be a positive int.*rank=-3"),
        ({"rank": 2.0}, TypeError, r"rank must be a positive int.*rank=2.0"),
        ({"rank": True}, TypeError, r"rank must be.*rank=True"),
        ({"rank": "8"}, TypeError, r"rank must be.*rank='8'"),
        ({"alpha": "16"}, TypeError, r"alpha must be a number"),
        ({"alpha": float("nan")}, ValueError, r"alpha must be a finite"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"dropout": None}, TypeError, r"dropout must be a number"),
        ({"block_size": 48}, ValueError, r"block_size must be one of \(32"),
        ({"block_size": 64.0}, TypeError, r"block_size must be one of"),
        ({"double_quant": "yes"}, TypeError, r"double_quant must be True or"),
        ({"scale_search": 1}, TypeError, r"scale_search must be True or"),
        ({"use_rslora": None}, TypeError, r"use_rslora must be True or"),
    ],
)
def test_one_exception_type_per_kind_of_mistake(kwargs, error, match):
    with pytest.raises(error, match=match):
        QLoRASettings(**kwargs)
    # apply() makes the same object, so it raises the same error, before
    # the model changes.
    model = _model()
    with pytest.raises(error, match=match):
        keras_qlora.apply(model, **kwargs, verbose=False)
    assert type(model.get_layer("query")) is keras.layers.Dense


def test_values_are_normalized_and_frozen():
    s = QLoRASettings(rank=np.int64(4), alpha=8, double_quant=np.bool_(True))
    assert (type(s.rank), type(s.alpha), type(s.double_quant)) == (
        int,
        float,
        bool,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.rank = 2
    assert s.replace(rank=2).rank == 2 and s.rank == 4
    with pytest.raises(ValueError, match="rank must be a positive"):
        s.replace(rank=0)


def test_lora_scale_and_for_layer():
    s = QLoRASettings(rank=4, alpha=8)
    assert s.lora_scale == 2.0
    assert QLoRASettings(rank=4, alpha=8, use_rslora=True).lora_scale == 4.0
    assert s.for_layer(True) is s
    frozen = s.for_layer(False)
    assert (frozen.rank, frozen.has_lora, frozen.lora_scale) == (None, False, 0)
    assert frozen.block_size == s.block_size


def test_dict_round_trip_and_unknown_keys():
    s = QLoRASettings(rank=4, alpha=32, block_size=128, scale_search=False)
    assert QLoRASettings.from_dict(s.to_dict()) == s
    # A config written before the settings object: alpha as an int.
    assert QLoRASettings.from_dict({"rank": 4, "alpha": 32}).alpha == 32.0
    with pytest.raises(ValueError, match=r"Unknown QLoRA settings \['r'\]"):
        QLoRASettings.from_dict({"r": 4})
    with pytest.raises(TypeError, match="must be a dict"):
        QLoRASettings.from_dict([("rank", 4)])
    assert s["block_size"] == 128
    with pytest.raises(KeyError):
        s["target_modules"]


def test_layer_spelling():
    s = QLoRASettings(rank=4, alpha=8, dropout=0.1)
    config = s.layer_config()
    assert config == {
        "rank": 4,
        "lora_alpha": 8.0,
        "lora_dropout": 0.1,
        "use_rslora": False,
        "block_size": 64,
        "double_quant": True,
        "quant_type": "nf4",
    }
    assert QLoRASettings.from_layer_config(config, "q") == s
    # Errors name the layer and use the layer's argument names.
    with pytest.raises(ValueError, match=r"Layer 'q': lora_dropout must be in"):
        QLoRASettings.from_layer_config({"lora_dropout": 2.0}, "q")
    with pytest.raises(TypeError, match=r"Layer 'q': unknown QLoRA arguments"):
        QLoRASettings.from_layer_config({"alpha": 2.0}, "q")


def test_layer_takes_settings_or_arguments_not_both():
    s = QLoRASettings(rank=4, alpha=8)
    layer = keras_qlora.QLoRADense(16, settings=s, name="q")
    assert layer.settings is s
    assert (layer.rank, layer.lora_alpha, layer.lora_scale) == (4, 8.0, 2.0)
    same = keras_qlora.QLoRADense(16, rank=4, lora_alpha=8, name="q")
    assert same.settings == s
    assert same.get_config()["lora_alpha"] == 8.0
    with pytest.raises(TypeError, match="Layer 'q': pass either settings"):
        keras_qlora.QLoRADense(16, settings=s, rank=2, name="q")
    with pytest.raises(TypeError, match="Layer 'q': pass either settings"):
        keras_qlora.QLoRADense(16, settings={"rank": 4}, name="q")


def test_apply_carries_one_object_to_every_layer(tmp_path):
    model = keras_qlora.apply(
        _model(),
        rank=4,
        alpha=8,
        target_modules=["query"],
        block_size=32,
        verbose=False,
    )
    settings = model.settings
    assert isinstance(settings, QLoRASettings)
    layers = model.qlora_layers()
    assert layers["query"].settings is settings
    assert layers["out"].settings == settings.for_layer(False)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.settings == settings
    assert loaded.qlora_layers()["query"].settings == settings


def test_apply_with_rank_none_and_targets_is_refused():
    with pytest.raises(ValueError, match=r"rank must be a positive int.*None"):
        keras_qlora.apply(_model(), rank=None, verbose=False)
    # Without targets, no rank is needed.
    model = keras_qlora.apply(
        _model(), rank=None, target_modules=None, verbose=False
    )
    assert not model.qlora_layers(lora_only=True)


# -- TrainingOptions ----------------------------------------------------------


def test_training_options():
    opts = TrainingOptions(bias="all", optimizer_8bit=True)
    assert opts["bias"] == "all" and opts.optimizer_8bit
    assert TrainingOptions.from_dict(opts.to_dict()) == opts
    assert TrainingOptions.from_dict(None) == TrainingOptions()
    with pytest.raises(ValueError, match=r"Unknown training options \['x'\]"):
        TrainingOptions.from_dict({"x": 1})
    with pytest.raises(ValueError, match="bias must be one of"):
        TrainingOptions(bias="some")
    with pytest.raises(TypeError, match="offload_optimizer must be True or"):
        TrainingOptions(offload_optimizer=1)
    with pytest.raises(ValueError, match="optimizer_8bit=True needs LoRA"):
        TrainingOptions(optimizer_8bit=True).check_model(has_lora=False)
    TrainingOptions(optimizer_8bit=True).check_model(has_lora=True)


def test_optimizer_option_without_lora_is_refused_by_one_rule():
    # The rule is "no replaced layer carries LoRA", whatever the reason.
    model = _model()
    with pytest.raises(ValueError, match="optimizer_8bit=True needs LoRA"):
        keras_qlora.apply(
            model, target_modules=None, optimizer_8bit=True, verbose=False
        )
    assert type(model.get_layer("query")) is keras.layers.Dense
