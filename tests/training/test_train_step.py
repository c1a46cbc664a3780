"""The LoRA-only train_step: what trains, what does not, and that fit,
evaluate, validation, callbacks and the progress bar behave as in Keras."""

import functools

import keras
import numpy as np
import pytest

import keras_qlora


def _task(seed=0, n=192):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 24)).astype("float32")
    y = np.tanh(x @ rng.standard_normal((24, 8)).astype("float32"))
    return x, y


def _model():
    return keras.Sequential(
        [
            keras.Input((24,)),
            keras.layers.Dense(64, activation="gelu", name="query"),
            keras.layers.Dense(64, activation="gelu", name="mlp"),
            keras.layers.Dense(8, name="head"),
        ]
    )


def _qlora(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    return keras_qlora.apply(_model(), rank=4, verbose=False, **kwargs)


def test_same_trajectory_as_keras_default_step():
    x, y = _task()
    ours, default = _qlora(), _qlora()
    # The stock Keras step on an identical model, for reference.
    default.train_step = functools.partial(keras.Model.train_step, default)
    results = []
    for model in (ours, default):
        model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="mse")
        hist = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
        results.append((hist.history["loss"], model.trainable_variables))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


def test_slots_only_for_lora_and_frozen_state_untouched():
    x, y = _task()
    q = _qlora()
    frozen = {v.path: v.numpy().copy() for v in q.non_trainable_variables}
    q.compile(optimizer="adamw", loss="mse")
    q.fit(x, y, batch_size=32, epochs=1, verbose=0)
    lora = {v.path for v in q.trainable_variables}
    base = q.base_model.name  # the Sequential's scope, as for float layers
    assert lora == {f"{base}/query/lora_a", f"{base}/query/lora_b"}
    slot_refs = [v.path for v in q.optimizer.variables if "lora" in v.path]
    assert len(slot_refs) == 2 * len(lora)  # m and v per LoRA matrix
    assert not any("nf4" in v.path for v in q.optimizer.variables)
    for v in q.non_trainable_variables:
        np.testing.assert_array_equal(v.numpy(), frozen[v.path])


def test_fit_evaluate_validation_callbacks_and_progress_bar(capsys):
    x, y = _task()
    q = _qlora()
    q.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"])
    seen = []
    hist = q.fit(
        x[:128],
        y[:128],
        validation_data=(x[128:], y[128:]),
        batch_size=32,
        epochs=3,
        verbose=1,
        callbacks=[
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: seen.append(epoch)
            )
        ],
    )
    out = capsys.readouterr().out
    assert "Epoch 3/3" in out and "val_loss" in out and "4/4" in out
    assert seen == [0, 1, 2]
    assert set(hist.history) == {"loss", "mae", "val_loss", "val_mae"}
    assert hist.history["loss"][-1] < hist.history["loss"][0]
    loss, mae = q.evaluate(x[128:], y[128:], verbose=0)
    np.testing.assert_allclose(loss, hist.history["val_loss"][-1], rtol=1e-5)


@pytest.mark.parametrize(
    "bias, expected",
    [
        ("none", set()),
        ("lora_only", {"query/bias"}),
        ("all", {"query/bias", "mlp/bias", "head/bias"}),
    ],
)
def test_bias_option_trains_the_chosen_biases(bias, expected):
    x, y = _task()
    q = _qlora(bias=bias)
    expected = {f"{q.base_model.name}/{path}" for path in expected}
    trainable = {v.path for v in q.trainable_variables if "bias" in v.path}
    assert trainable == expected
    before = {v.path: v.numpy().copy() for v in q.weights if "bias" in v.path}
    q.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    q.fit(x, y, batch_size=32, epochs=1, verbose=0)
    changed = {
        v.path
        for v in q.weights
        if "bias" in v.path and not np.array_equal(v.numpy(), before[v.path])
    }
    assert changed == expected


def test_bias_option_survives_keras_round_trip(tmp_path):
    q = _qlora(bias="all")
    path = str(tmp_path / "m.keras")
    q.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.training_options["bias"] == "all"
    # Keras reloads a Sequential's layers outside its name scope: paths
    # lose `sequential_<n>/`, for float and QLoRA layers alike.
    assert {v.path for v in loaded.trainable_variables} == {
        v.path.partition("/")[2] for v in q.trainable_variables
    }


def test_modules_to_save_head_trains():
    x, y = _task()
    q = _qlora(modules_to_save=["head"], quantize_modules=["query", "mlp"])
    head_before = q.base_model.get_layer("head").kernel.numpy().copy()
    q.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    q.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert not np.array_equal(
        q.base_model.get_layer("head").kernel.numpy(), head_before
    )


def test_layer_trainable_flag_does_not_unfreeze_nf4_state():
    q = _qlora()
    q.base_model.get_layer("mlp").trainable = True
    assert not any("nf4" in v.path for v in q.trainable_variables)


def test_unfrozen_nf4_weights_are_refused():
    x, y = _task()
    q = _qlora()
    q.base_model.get_layer("mlp").nf4_absmax_scale.trainable = True
    q.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match=r"frozen 4-bit weights .*mlp/nf4"):
        q.fit(x, y, batch_size=32, epochs=1, verbose=0)


def test_quantize_only_model_has_nothing_to_train():
    x, y = _task()
    q = _qlora(target_modules=None)
    assert not q.qlora_layers(lora_only=True)
    assert len(q.qlora_layers()) == 3
    q.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="has nothing to train"):
        q.fit(x, y, batch_size=32, epochs=1, verbose=0)


@pytest.mark.parametrize("option", ["offload_optimizer", "optimizer_8bit"])
def test_optimizer_options_need_lora(option):
    model = _model()
    with pytest.raises(ValueError, match=f"{option}=True needs LoRA"):
        keras_qlora.apply(
            model, target_modules=None, verbose=False, **{option: True}
        )
    # Refused before anything was edited.
    assert type(model.get_layer("query")) is keras.layers.Dense


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"bias": "some"}, ValueError, "bias must be one of"),
        ({"offload_optimizer": "yes"}, TypeError, "offload_optimizer must be"),
        ({"optimizer_8bit": 1}, TypeError, "optimizer_8bit must be"),
        ({"gradient_checkpointing": 3}, TypeError, "gradient_checkpointing"),
    ],
)
def test_bad_training_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_qlora.apply(_model(), verbose=False, **kwargs)
