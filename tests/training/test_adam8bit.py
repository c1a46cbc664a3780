"""AdamW8bit: 8-bit state quantization, parity with keras AdamW, fit."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_qlora
from keras_qlora.quantizers import codes
from keras_qlora.training.adam8bit import AdamW8bit
from keras_qlora.training.adam8bit import dequantize_blockwise_8bit
from keras_qlora.training.adam8bit import quantize_blockwise_8bit

_MAPS = {
    "signed": (codes.dynamic_map, codes.dynamic_map_midpoints),
    "unsigned": (
        codes.unsigned_dynamic_map,
        codes.unsigned_dynamic_map_midpoints,
    ),
}


def _wide_range_values(seed, size, signed):
    """Values spanning ~6 decades, like Adam moments of a real model."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(size) * np.exp(rng.uniform(-12, 2, size))
    x = x.astype("float32")
    return x if signed else x * x


# -- code tables and the blockwise quantizer --------------------------------


def test_unsigned_dynamic_map_equals_bitsandbytes_exactly(bnb):
    theirs = bnb.functional.create_dynamic_map(signed=False).numpy()
    ours = codes.unsigned_dynamic_map()
    assert ours.dtype == np.float32 and ours.shape == (256,)
    assert np.all(np.diff(ours) > 0)
    assert ours[0] == 0.0 and ours[-1] == 1.0
    np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(ValueError, match="read-only"):
        ours[0] = 1.0


@pytest.mark.parametrize("kind", ["signed", "unsigned"])
def test_codes_equal_bitsandbytes_reference_quantizer(bnb, kind):
    # bitsandbytes' pure-torch backend: bucketize on the code midpoints.
    torch = bnb.torch
    x = _wide_range_values(0, 5000, kind == "signed")
    q, absmax = quantize_blockwise_8bit(x, _MAPS[kind][1](), 256)
    code = bnb.functional.create_dynamic_map(signed=kind == "signed")
    blocks = torch.from_numpy(np.pad(x, (0, 5120 - 5000)).reshape(20, 256))
    theirs_absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / theirs_absmax.view(-1, 1)), -1, 1)
    bounds = (code[:-1] + code[1:]) / 2
    theirs = torch.bucketize(scaled.reshape(-1), bounds)[:5000].numpy()
    np.testing.assert_array_equal(np.asarray(absmax), theirs_absmax.numpy())
    np.testing.assert_array_equal(np.asarray(q), theirs.astype(np.uint8))


@pytest.mark.parametrize("kind", ["signed", "unsigned"])
def test_round_trip_error_is_within_half_a_code_gap(kind):
    table, mids = _MAPS[kind][0](), _MAPS[kind][1]()
    x = _wide_range_values(1, 1000, kind == "signed")
    x[256:512] = 0.0  # an all-zero block
    q, absmax = quantize_blockwise_8bit(x, mids, 256)
    q, absmax = np.asarray(q), np.asarray(absmax)
    assert q.dtype == np.uint8 and q.shape == (1000,)
    assert absmax.shape == (4,)  # last block partial: 1000 = 3 * 256 + 232
    padded = np.pad(np.abs(x), (0, 24)).reshape(4, 256)
    np.testing.assert_array_equal(absmax, padded.max(axis=1))
    back = np.asarray(dequantize_blockwise_8bit(q, absmax, table, 256))
    np.testing.assert_array_equal(back[256:512], 0.0)
    # Each value lands on its nearest code: the error, in units of its
    # block's absmax, is at most half the gap around the chosen code.
    scale = np.repeat(absmax, 256)[:1000]
    normed_err = np.abs(back - x) / np.where(scale > 0, scale, 1)
    gaps = np.diff(table)
    local = np.maximum(
        np.concatenate([[0], gaps])[q], np.concatenate([gaps, [0]])[q]
    )
    assert np.all(normed_err <= local / 2 * (1 + 1e-5) + 1e-12)
    # Overall, on Gaussian data: values >= 10% of their block's absmax come
    # back within 7% (the coarsest gap, 0.9 / 64 of absmax, halved, over
    # 0.1), about 1% on average.
    g = np.random.default_rng(2).standard_normal(4096).astype("float32")
    g = g if kind == "signed" else g * g
    q, absmax = quantize_blockwise_8bit(g, mids, 256)
    back = np.asarray(dequantize_blockwise_8bit(q, absmax, table, 256))
    scale = np.repeat(np.asarray(absmax), 256)
    big = np.abs(g) >= 0.1 * scale
    assert big.sum() > 1000
    rel = np.abs(back - g)[big] / np.abs(g)[big]
    assert rel.max() < 0.075, rel.max()
    assert rel.mean() < 0.02, rel.mean()


# -- one optimizer against keras AdamW --------------------------------------


def _run(optimizer, w0, grads, use_tf_function=False):
    variable = keras.Variable(w0.copy(), name="w")

    def step(g):
        optimizer.apply_gradients([(g, variable)])

    if use_tf_function:
        step = tf.function(step)
    for g in grads:
        step(tf.constant(g))
    return variable.numpy()


def _problem(steps, shape=(64, 128)):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(shape).astype("float32")
    scales = np.exp(rng.uniform(-3, 0, steps)).astype("float32")
    grads = [rng.standard_normal(shape).astype("float32") * s for s in scales]
    return w0, grads


def test_first_step_equals_keras_adamw_and_later_steps_stay_close():
    w0, grads = _problem(20)
    hp = dict(learning_rate=1e-2, weight_decay=0.01)
    # Step 1 starts from zero moments, so the 8-bit rounding (applied only
    # to the stored state) cannot change it.
    first = _run(AdamW8bit(**hp), w0, grads[:1])
    np.testing.assert_allclose(
        first, _run(keras.optimizers.AdamW(**hp), w0, grads[:1]), atol=1e-7
    )
    opt = AdamW8bit(**hp)
    ours = _run(opt, w0, grads, use_tf_function=True)
    theirs = _run(keras.optimizers.AdamW(**hp), w0, grads)
    assert opt.is_8bit(opt._trainable_variables[0])
    moved = np.linalg.norm(theirs - w0)
    assert moved > 1.0  # the weights really moved
    # Measured 1.7% after 20 steps.
    assert np.linalg.norm(ours - theirs) / moved < 0.03


def _stored_moments(opt):
    m = dequantize_blockwise_8bit(
        opt._m_codes[0], opt._m_absmax[0], codes.dynamic_map(), 256
    )
    v = dequantize_blockwise_8bit(
        opt._v_codes[0], opt._v_absmax[0], codes.unsigned_dynamic_map(), 256
    )
    return np.asarray(m), np.asarray(v)


@pytest.mark.parametrize("steps", [1, 5])
def test_stored_moments_match_keras_moments_within_quantization(steps):
    w0, grads = _problem(steps)
    opt = AdamW8bit(learning_rate=1e-2)
    ref = keras.optimizers.AdamW(learning_rate=1e-2)
    _run(opt, w0, grads)
    _run(ref, w0, grads)
    m_ref, v_ref = (np.asarray(s).reshape(-1) for s in ref.variables[2:4])
    stored = _stored_moments(opt)
    # The maps' coarsest gaps are 0.9 / 64 (signed) and 0.9 / 128
    # (unsigned) of the block absmax. After one step the moments are exact
    # before rounding, so the stored error is at most half a gap.
    gaps = (0.9 / 64, 0.9 / 128)
    for ours, theirs, gap in zip(stored, (m_ref, v_ref), gaps, strict=True):
        block_max = np.abs(theirs).reshape(-1, 256).max(axis=1)
        err = np.abs(ours - theirs).reshape(-1, 256).max(axis=1)
        if steps == 1:
            assert np.all(err <= block_max * gap / 2 * (1 + 1e-4))
        # Later, rounding errors of earlier steps carry over (decayed by
        # beta). Relative L2 error measured: m 1.1%, v 0.7% after one step;
        # m 2.1%, v 1.2% after five.
        rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
        assert rel < 0.03, rel


def test_small_variables_keep_float_moments_identical_to_keras():
    w0, grads = _problem(10)
    hp = dict(learning_rate=3e-3, weight_decay=0.05, clipnorm=1.0)
    opt = AdamW8bit(min_8bit_size=w0.size + 1, **hp)
    ours = _run(opt, w0, grads, use_tf_function=True)
    theirs = _run(keras.optimizers.AdamW(**hp), w0, grads, True)
    assert not opt.is_8bit(opt._trainable_variables[0])
    assert all(v.dtype != "uint8" for v in opt.variables)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def test_adam_mode_without_weight_decay_matches_keras_adam():
    w0, grads = _problem(6)
    ours = _run(
        AdamW8bit(learning_rate=1e-2, weight_decay=None, min_8bit_size=10**9),
        w0,
        grads,
    )
    theirs = _run(keras.optimizers.Adam(learning_rate=1e-2), w0, grads)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


# -- memory and state variables ---------------------------------------------


def test_state_is_about_two_bytes_per_parameter():
    big = keras.Variable(np.zeros((1024, 1024), "float32"), name="big")
    small = keras.Variable(np.zeros((100,), "float32"), name="small")
    opt = AdamW8bit()
    with pytest.raises(ValueError, match="needs a built optimizer"):
        opt.state_bytes()
    opt.build([big])
    per_param = opt.state_bytes() / (1024 * 1024)
    assert per_param == pytest.approx(2 + 8 / 256)  # 2.03125
    # Below min_8bit_size: two float32 moments, 8 bytes per parameter.
    opt_small = AdamW8bit()
    opt_small.build([small])
    assert opt_small.state_bytes() == 8 * 100
    # The state is ordinary optimizer variables (so it is checkpointed).
    dtypes = sorted(
        keras.backend.standardize_dtype(v.dtype)
        for v in opt.variables
        if "big" in v.path
    )
    assert dtypes == ["float32", "float32", "uint8", "uint8"]
    sizes = sorted(math.prod(v.shape) for v in opt.variables if "big" in v.path)
    assert sizes == [4096, 4096, 1024 * 1024, 1024 * 1024]


def test_state_round_trips_through_save_and_load_own_variables():
    w0, grads = _problem(4)
    original = keras.Variable(w0.copy(), name="w")
    opt = AdamW8bit(learning_rate=1e-2)
    for g in grads[:2]:
        opt.apply_gradients([(g, original)])
    store = {}
    opt.save_own_variables(store)
    assert any(v.dtype == np.uint8 for v in store.values())
    # A fresh optimizer loaded with that state continues identically.
    resumed_var = keras.Variable(original.numpy(), name="w")
    resumed = AdamW8bit(learning_rate=1e-2)
    resumed.build([resumed_var])
    resumed.load_own_variables(store)
    unloaded_var = keras.Variable(original.numpy(), name="w")
    unloaded = AdamW8bit(learning_rate=1e-2)
    for g in grads[2:]:
        opt.apply_gradients([(g, original)])
        resumed.apply_gradients([(g, resumed_var)])
        unloaded.apply_gradients([(g, unloaded_var)])
    np.testing.assert_array_equal(resumed_var.numpy(), original.numpy())
    assert int(resumed.iterations) == 4
    # Without the loaded moments the result differs: the check has teeth.
    assert not np.allclose(unloaded_var.numpy(), original.numpy())


# -- model.fit on a QLoRA model ---------------------------------------------


def _task(n=512):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 32)).astype("float32")
    y = np.tanh(x @ rng.standard_normal((32, 8)).astype("float32"))
    return x, y


def _qlora_fit(optimizer, epochs=13):
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(128, activation="gelu", name="query"),
            keras.layers.Dense(128, activation="gelu", name="value"),
            keras.layers.Dense(8, name="head"),
        ]
    )
    model = keras_qlora.apply(
        base,
        rank=16,
        target_modules=("query", "value"),
        modules_to_save=["head"],
        verbose=False,
    )
    model.compile(optimizer=optimizer, loss="mse")
    x, y = _task()
    history = model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    return history.history["loss"], model


def test_fit_loss_curve_matches_keras_adamw():
    # 8 batches x 13 epochs = 104 steps; every variable quantized.
    hp = dict(learning_rate=3e-3, weight_decay=0.01)
    opt = AdamW8bit(min_8bit_size=0, **hp)
    ours, model = _qlora_fit(opt)
    theirs, _ = _qlora_fit(keras.optimizers.AdamW(**hp))
    assert int(opt.iterations) == 104
    assert all(opt.is_8bit(v) for v in model.trainable_variables)
    assert ours[-1] < 0.3 * ours[0] and theirs[-1] < 0.3 * theirs[0]
    # Measured: the curves agree to 0.06% at every epoch.
    np.testing.assert_allclose(ours, theirs, rtol=0.01)


def test_fit_under_mixed_bfloat16():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        opt = AdamW8bit(learning_rate=3e-3, min_8bit_size=0)
        losses, model = _qlora_fit(opt, epochs=4)
    finally:
        keras.config.set_dtype_policy("float32")
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert losses[-1] < 0.6 * losses[0]


# -- configuration ----------------------------------------------------------


def test_get_config_round_trips_with_a_schedule():
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=100)
    opt = AdamW8bit(
        learning_rate=schedule,
        weight_decay=0.02,
        beta_1=0.8,
        beta_2=0.99,
        epsilon=1e-6,
        block_size=128,
        min_8bit_size=0,
        global_clipnorm=1.0,
    )
    config = opt.get_config()
    clone = AdamW8bit.from_config(config)
    assert clone.get_config() == config
    assert config["block_size"] == 128 and config["min_8bit_size"] == 0
    assert isinstance(clone._learning_rate, type(schedule))
    assert clone._learning_rate.get_config() == schedule.get_config()
    # Registered: generic Keras deserialization finds the class.
    revived = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(revived) is AdamW8bit
    assert revived.get_config() == config


def test_from_optimizer_copies_hyperparameters():
    schedule = keras.optimizers.schedules.ExponentialDecay(2e-3, 10, 0.9)
    adamw = keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=0.03,
        beta_1=0.85,
        beta_2=0.98,
        epsilon=1e-5,
        clipnorm=0.5,
    )
    opt = AdamW8bit.from_optimizer(adamw, block_size=64)
    assert opt._learning_rate is schedule
    assert (opt.weight_decay, opt.beta_1, opt.beta_2) == (0.03, 0.85, 0.98)
    assert (opt.epsilon, opt.clipnorm, opt.block_size) == (1e-5, 0.5, 64)
    assert opt.name != adamw.name

    adam = AdamW8bit.from_optimizer(keras.optimizers.Adam(5e-4, beta_1=0.7))
    assert adam.weight_decay is None and adam.beta_1 == 0.7
    assert float(adam.learning_rate) == pytest.approx(5e-4)

    assert AdamW8bit.from_optimizer("adam").weight_decay is None
    assert AdamW8bit.from_optimizer("AdamW").weight_decay == 0.004


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "256"])
def test_bad_block_size_is_refused(bad):
    with pytest.raises(ValueError, match=r"`block_size` must be a positive"):
        AdamW8bit(block_size=bad)


def test_bad_min_8bit_size_is_refused():
    with pytest.raises(ValueError, match=r"min_8bit_size=-1"):
        AdamW8bit(min_8bit_size=-1)


def test_amsgrad_is_refused():
    with pytest.raises(ValueError, match="does not support amsgrad"):
        AdamW8bit(amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad=True"):
        AdamW8bit.from_optimizer(keras.optimizers.Adam(amsgrad=True))


def test_from_optimizer_refuses_other_optimizers():
    with pytest.raises(TypeError, match="only keras.optimizers.Adam.*SGD"):
        AdamW8bit.from_optimizer(keras.optimizers.SGD())
    with pytest.raises(ValueError, match="only 'adam' and 'adamw'.*'sgd'"):
        AdamW8bit.from_optimizer("sgd")
