"""Host-resident optimizer state (`offload_optimizer=True`)."""

import keras
import numpy as np
import pytest

import keras_qlora
from keras_qlora.training import HostOffloadOptimizer


def _task(seed=0, n=128):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 24)).astype("float32")
    y = np.tanh(x @ rng.standard_normal((24, 8)).astype("float32"))
    return x, y


def _qlora(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((24,)),
            keras.layers.Dense(64, activation="gelu", name="query"),
            keras.layers.Dense(8, name="value"),
        ]
    )
    return keras_qlora.apply(model, rank=4, verbose=False, **kwargs)


def _fit(model, optimizer, epochs=3):
    x, y = _task()
    model.compile(optimizer=optimizer, loss="mse")
    hist = model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    return hist.history["loss"]


def _adamw():
    return keras.optimizers.AdamW(5e-3, weight_decay=0.01)


def test_same_trajectory_as_plain_adamw_and_state_on_host():
    plain, offloaded = _qlora(), _qlora(offload_optimizer=True)
    want = _fit(plain, _adamw())
    got = _fit(offloaded, _adamw())
    assert isinstance(offloaded.optimizer, HostOffloadOptimizer)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(offloaded.trainable_variables, plain.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-8)
    # The moments exist for the LoRA matrices only, and live on the host.
    slots = offloaded.optimizer.host_variables()
    moments = [v for v in slots if "lora" in v.path]
    assert len(moments) == 2 * len(offloaded.trainable_variables)
    assert all("CPU" in v.value.device for v in slots), [
        v.value.device for v in slots
    ]
    assert offloaded.optimizer.iterations.numpy() == 12


def test_weights_restored_between_fits_are_respected():
    # The host copies are refreshed from the model every step, so weights
    # loaded after the optimizer is built are not overwritten.
    plain, offloaded = _qlora(), _qlora(offload_optimizer=True)
    for model in (plain, offloaded):
        _fit(model, keras.optimizers.SGD(0.05), epochs=1)
        for v in model.trainable_variables:
            v.assign(np.full(v.shape, 0.01, "float32"))
    want = _fit(plain, plain.optimizer, epochs=1)
    got = _fit(offloaded, offloaded.optimizer, epochs=1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_under_mixed_float16_loss_scaling_wraps_the_offload(
    dtype_policy_guard,
):
    keras.config.set_dtype_policy("mixed_float16")
    q = _qlora(offload_optimizer=True)
    losses = _fit(q, keras.optimizers.Adam(1e-2), epochs=4)
    assert isinstance(q.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(q.optimizer.inner_optimizer, HostOffloadOptimizer)
    assert losses[-1] < 0.9 * losses[0]
    assert all(v.dtype == "float32" for v in q.trainable_variables)


def test_config_round_trip():
    opt = HostOffloadOptimizer(keras.optimizers.AdamW(3e-4, beta_2=0.95))
    clone = HostOffloadOptimizer.from_config(opt.get_config())
    assert isinstance(clone.inner_optimizer, keras.optimizers.AdamW)
    assert clone.inner_optimizer.beta_2 == 0.95
    np.testing.assert_allclose(float(clone.learning_rate), 3e-4, rtol=1e-6)
    assert clone.host_device == "/CPU:0"


class _Custom(keras.optimizers.Optimizer):
    def update_step(self, gradient, variable, learning_rate):
        variable.assign_sub(gradient * learning_rate)


@pytest.mark.parametrize(
    "optimizer, match",
    [
        (_Custom(learning_rate=0.1), "does not support _Custom"),
        (
            keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()),
            "does not support LossScaleOptimizer",
        ),
    ],
)
def test_unsupported_optimizers_are_refused(optimizer, match):
    q = _qlora(offload_optimizer=True)
    with pytest.raises(TypeError, match=match):
        q.compile(optimizer=optimizer, loss="mse")


def test_non_keras_optimizer_is_refused():
    with pytest.raises((TypeError, ValueError), match="optimizer"):
        HostOffloadOptimizer(object())


def test_bad_host_device():
    with pytest.raises(TypeError, match="host_device must be"):
        HostOffloadOptimizer("adam", host_device=0)


def test_keras_file_round_trip_keeps_the_offloaded_state(tmp_path):
    q = _qlora(offload_optimizer=True)
    _fit(q, _adamw(), epochs=1)
    path = str(tmp_path / "offload.keras")
    q.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.training_options["offload_optimizer"] is True
    assert isinstance(loaded.optimizer, HostOffloadOptimizer)
    # Keras reloads a Sequential's layers outside its name scope: the slots
    # lose the `sequential_<n>_` of the variable paths they are named after.
    prefix = f"{q.base_model.name}_"
    want = {
        v.path.replace(prefix, "", 1): v.numpy()
        for v in q.optimizer.host_variables()
    }
    got = {v.path: v.numpy() for v in loaded.optimizer.host_variables()}
    assert got.keys() == want.keys() and len(got) >= 6
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    # Training goes on identically from the loaded state.
    np.testing.assert_allclose(
        _fit(loaded, loaded.optimizer, epochs=1),
        _fit(q, q.optimizer, epochs=1),
        rtol=1e-6,
    )


def test_8bit_state_offloaded_through_apply_options():
    q = _qlora(offload_optimizer=True, optimizer_8bit=True)
    losses = _fit(q, keras.optimizers.AdamW(1e-2), epochs=4)
    opt = q.optimizer
    assert isinstance(opt, HostOffloadOptimizer)
    assert isinstance(opt.inner_optimizer, keras_qlora.training.AdamW8bit)
    assert opt.inner_optimizer.learning_rate.numpy() == np.float32(1e-2)
    assert losses[-1] < 0.8 * losses[0]


def test_8bit_option_refuses_other_optimizers():
    q = _qlora(optimizer_8bit=True)
    with pytest.raises(TypeError, match="Adam"):
        q.compile(optimizer=keras.optimizers.SGD(), loss="mse")
