"""QLoRADense: NF4 Dense forward, LoRA, dtypes, config, variables, grads."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_qlora.layers import QLoRADense
from keras_qlora.quantizers import dequantize_nf4
from keras_qlora.quantizers import quantize_nf4

K, N = 24, 10


def random(shape, seed, std=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * std).astype("float32")


def make_dense(k=K, n=N, seed=0, **kwargs):
    dense = keras.layers.Dense(n, name="proj", **kwargs)
    dense.build((None, k))
    dense.kernel.assign(random((k, n), seed, std=0.2))
    if dense.use_bias:
        dense.bias.assign(random((n,), seed + 1))
    return dense


def set_lora(layer, seed=3):
    a = random(layer.lora_a.shape, seed)
    b = random(layer.lora_b.shape, seed + 1)
    layer.lora_a.assign(a)
    layer.lora_b.assign(b)
    return a, b


@pytest.fixture
def mixed_bfloat16_policy():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy("float32")


# -- forward ----------------------------------------------------------------


@pytest.mark.parametrize("x_shape", [(3, K), (2, 4, K)])
def test_output_at_init_is_dequantized_dense(x_shape):
    dense = make_dense()
    layer = QLoRADense.from_layer(dense, rank=4)
    np.testing.assert_array_equal(layer.lora_b.numpy(), 0.0)
    x = random(x_shape, 5)
    w = dequantize_nf4(layer.nf4_state())
    expected = x @ w + dense.bias.numpy()
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-5)
    # ... and close to the float layer it replaces.
    float_out = dense(x).numpy()
    assert (
        np.abs(layer(x).numpy() - float_out).max()
        < 0.25 * np.abs(float_out).max()
    )


def test_state_is_the_quantized_kernel():
    dense = make_dense()
    layer = QLoRADense.from_layer(dense, block_size=32, double_quant=False)
    want = quantize_nf4(dense.kernel.numpy(), 32, False, scale_search=True)
    got = layer.nf4_state()
    assert got.shape == (K, N) and got.block_size == 32
    np.testing.assert_array_equal(got.packed, want.packed)
    np.testing.assert_array_equal(got.absmax, want.absmax)


@pytest.mark.parametrize(
    "use_rslora, scale",
    [(False, 8.0 / 4), (True, 8.0 / math.sqrt(4))],
)
def test_lora_contributes(use_rslora, scale):
    layer = QLoRADense.from_layer(
        make_dense(), rank=4, lora_alpha=8.0, use_rslora=use_rslora
    )
    assert layer.lora_scale == pytest.approx(scale)
    x = random((3, K), 6)
    base = layer(x).numpy()
    a, b = set_lora(layer)
    w = dequantize_nf4(layer.nf4_state())
    bias = layer.bias.numpy()
    expected = x @ w + bias + scale * (x @ a @ b)
    out = layer(x).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    assert np.abs(out - base).max() > 1.0
    layer.lora_enabled = False
    np.testing.assert_allclose(layer(x).numpy(), base, atol=1e-6)


def test_lora_dropout_only_in_training():
    layer = QLoRADense.from_layer(make_dense(), rank=4, lora_dropout=0.5)
    set_lora(layer)
    x = random((16, K), 7)
    no_drop = QLoRADense.from_layer(make_dense(), rank=4)
    no_drop.lora_a.assign(layer.lora_a)
    no_drop.lora_b.assign(layer.lora_b)
    np.testing.assert_allclose(
        layer(x, training=False).numpy(), no_drop(x).numpy(), atol=1e-6
    )
    assert np.abs(layer(x, training=True).numpy() - no_drop(x).numpy()).max()


def test_activation_and_no_bias():
    dense = make_dense(activation="relu", use_bias=False)
    layer = QLoRADense.from_layer(dense, rank=2)
    assert layer.bias is None
    x = random((5, K), 8)
    w = dequantize_nf4(layer.nf4_state())
    np.testing.assert_allclose(
        layer(x).numpy(), np.maximum(x @ w, 0), atol=1e-5
    )
    assert layer.compute_output_shape((None, 7, K)) == (None, 7, N)


# -- variables and dtypes ---------------------------------------------------


def test_only_lora_is_trainable():
    layer = QLoRADense.from_layer(make_dense(), rank=4)
    assert [v.path for v in layer.trainable_variables] == [
        layer.lora_a.path,
        layer.lora_b.path,
    ]
    assert layer.lora_a.shape == (K, 4) and layer.lora_b.shape == (4, N)
    frozen = {v.path.split("/")[-1] for v in layer.non_trainable_variables}
    assert frozen == {
        "nf4_packed",
        "nf4_absmax",
        "nf4_absmax_scale",
        "nf4_absmax_offset",
        "bias",
    }
    no_lora = QLoRADense.from_layer(make_dense(), rank=None)
    assert no_lora.trainable_variables == []
    assert no_lora.lora_a is None


def _check_mixed(layer, dense_float):
    assert layer.lora_a.dtype == "float32"
    assert layer.lora_b.dtype == "float32"
    assert layer.compute_dtype == "bfloat16"
    set_lora(layer)
    x = random((4, K), 9)
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    ref = QLoRADense.from_layer(dense_float, rank=4)
    ref.lora_a.assign(layer.lora_a)
    ref.lora_b.assign(layer.lora_b)
    expected = ref(x).numpy()
    got = np.asarray(out, dtype=np.float32)
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()


def test_mixed_bfloat16_source_layer():
    dense = make_dense(dtype="mixed_bfloat16")
    layer = QLoRADense.from_layer(dense, rank=4)
    assert layer.dtype_policy.name == "mixed_bfloat16"
    _check_mixed(layer, make_dense())


def test_mixed_bfloat16_global_policy(mixed_bfloat16_policy):
    dense = make_dense()
    assert dense.dtype_policy.name == "mixed_bfloat16"
    layer = QLoRADense.from_layer(dense, rank=4)
    _check_mixed(layer, make_dense(dtype="float32"))


def test_policy_fixture_restored():
    assert keras.config.dtype_policy().name == "float32"


# -- config and serialization -----------------------------------------------


def test_config_round_trip():
    layer = QLoRADense.from_layer(
        make_dense(activation="gelu"),
        rank=3,
        lora_alpha=6.0,
        lora_dropout=0.1,
        use_rslora=True,
        block_size=128,
        double_quant=False,
    )
    config = layer.get_config()
    assert config["units"] == N and config["rank"] == 3
    assert config["block_size"] == 128 and config["double_quant"] is False
    clone = QLoRADense.from_config(config)
    assert clone.get_config() == config
    clone.build((None, K))
    clone.set_weights(layer.get_weights())
    set_lora(layer)
    clone.set_weights(layer.get_weights())
    x = random((3, K), 10)
    np.testing.assert_array_equal(clone(x).numpy(), layer(x).numpy())


def test_save_and_load_own_variables():
    layer = QLoRADense.from_layer(make_dense(), rank=4)
    set_lora(layer)
    store = {}
    layer.save_own_variables(store)
    assert list(store) == [
        "nf4_packed",
        "nf4_absmax",
        "nf4_absmax_scale",
        "nf4_absmax_offset",
        "bias",
        "lora_a",
        "lora_b",
        "nf4_sha256",  # checksum of the four NF4 arrays
    ]
    fresh = QLoRADense.from_layer(make_dense(seed=20), rank=4, quantize=False)
    fresh.load_own_variables(store)
    x = random((3, K), 11)
    np.testing.assert_array_equal(fresh(x).numpy(), layer(x).numpy())

    del store["lora_b"]
    with pytest.raises(
        ValueError, match=r"Layer 'proj' cannot load .*no \['lora_b'\]"
    ):
        fresh.load_own_variables(store)
    store["lora_b"] = np.zeros((5, N), np.float32)
    with pytest.raises(ValueError, match=r"saved 'lora_b' has shape \(5, 10\)"):
        fresh.load_own_variables(store)


# -- errors -----------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -2])
def test_rank_not_positive(rank):
    with pytest.raises(
        ValueError, match=f"Layer 'proj': rank must be a positive int.*{rank}"
    ):
        QLoRADense.from_layer(make_dense(), rank=rank)


def test_rank_wrong_type():
    with pytest.raises(TypeError, match="Layer 'proj': rank must be a pos"):
        QLoRADense.from_layer(make_dense(), rank=2.0)


def test_rank_above_min_dim():
    with pytest.raises(
        ValueError,
        match=r"Layer 'proj': rank must be <= min\(K, N\) = 10 .*rank=11",
    ):
        QLoRADense.from_layer(make_dense(), rank=11)
    QLoRADense.from_layer(make_dense(), rank=10)  # the limit itself is fine


def test_non_float_kernel():
    dense = keras.layers.Dense(
        N, dtype="int32", kernel_initializer="zeros", name="ints"
    )
    dense.build((None, K))
    with pytest.raises(TypeError, match="Layer 'ints' has a int32 kernel"):
        QLoRADense.from_layer(dense)


def test_nan_kernel():
    dense = make_dense()
    kernel = dense.kernel.numpy()
    kernel[2, 3] = np.nan
    dense.kernel.assign(kernel)
    with pytest.raises(
        ValueError, match="Layer 'proj': its kernel has 1 non-finite"
    ):
        QLoRADense.from_layer(dense)


def test_from_layer_wrong_type_and_unbuilt():
    with pytest.raises(TypeError, match="expects a keras.layers.Dense.*Einsum"):
        QLoRADense.from_layer(keras.layers.EinsumDense("ab,bc->ac", (N,)))
    with pytest.raises(ValueError, match="Layer 'late' is not built"):
        QLoRADense.from_layer(keras.layers.Dense(N, name="late"))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="units must be a positive int"):
        QLoRADense(0)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        QLoRADense(4, rank=2, lora_dropout=1.0)
    with pytest.raises(ValueError, match="block_size must be one of"):
        QLoRADense(4, block_size=100)


def test_set_nf4_state_checks_the_state():
    layer = QLoRADense.from_layer(make_dense(), rank=2)
    wrong_shape = quantize_nf4(random((K, N + 1), 1))
    with pytest.raises(
        ValueError,
        match=r"Layer 'proj' holds .*\(\(24, 10\), 64, True, 'nf4'\).*"
        r"\(\(24, 11\), 64, True, 'nf4'\)",
    ):
        layer.set_nf4_state(wrong_shape)
    no_dq = quantize_nf4(random((K, N), 1), double_quant=False)
    with pytest.raises(ValueError, match=r"\(\(24, 10\), 64, False, 'nf4'\)"):
        layer.set_nf4_state(no_dq)
    with pytest.raises(TypeError, match="set_nf4_state expects an NF4State"):
        layer.set_nf4_state(no_dq.to_dict())
    unbuilt = QLoRADense(N, name="fresh")
    with pytest.raises(ValueError, match="Layer 'fresh' is not built"):
        unbuilt.nf4_state()
    # A matching state is loaded and used.
    state = quantize_nf4(random((K, N), 2))
    layer.set_nf4_state(state)
    x = random((2, K), 3)
    expected = x @ dequantize_nf4(state) + layer.bias.numpy()
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-5)


# -- gradients --------------------------------------------------------------


def test_gradients_reach_only_lora_and_input():
    layer = QLoRADense.from_layer(make_dense(), rank=4, lora_alpha=8.0)
    a, b = set_lora(layer)
    scale = layer.lora_scale
    w = dequantize_nf4(layer.nf4_state())
    x = tf.constant(random((3, K), 12))
    dy = random((3, N), 13)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x) * dy)
    # The bias is created TF-trainable (so gradients can flow through
    # tf.recompute_grad when it is opted in) but frozen for Keras; the NF4
    # state is never watched.
    watched = {v.name for v in tape.watched_variables()}
    assert watched == {"proj/lora_a:0", "proj/lora_b:0", "proj/bias:0"}
    assert not layer.bias.trainable
    nf4 = [v for v in layer.non_trainable_variables if "nf4" in v.name]
    assert len(nf4) == 4
    grads = tape.gradient(loss, [x, layer.lora_a, layer.lora_b] + nf4)
    dx, da, db = (g.numpy() for g in grads[:3])
    assert all(g is None for g in grads[3:])
    xn = x.numpy()
    np.testing.assert_allclose(
        dx, dy @ w.T + scale * dy @ b.T @ a.T, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        da, scale * xn.T @ dy @ b.T, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        db, scale * (xn @ a).T @ dy, rtol=1e-4, atol=1e-4
    )


def test_input_gradient_at_init_is_base_weight_transposed():
    layer = QLoRADense.from_layer(make_dense(), rank=4)
    w = dequantize_nf4(layer.nf4_state())
    x = tf.constant(random((2, 5, K), 14))
    dy = random((2, 5, N), 15)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x) * dy)
    dx, da = tape.gradient(loss, [x, layer.lora_a])
    np.testing.assert_allclose(dx.numpy(), dy @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(da.numpy(), 0.0)  # B = 0 blocks A's grad
