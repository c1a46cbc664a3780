"""QLoRAEinsumDense: forward equals einsum with the dequantized kernel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_qlora.layers import QLoRAEinsumDense
from keras_qlora.layers import plan_einsum
from keras_qlora.quantizers import dequantize_nf4
from keras_qlora.quantizers import quantize_nf4

# (equation, Keras output_shape, bias_axes, input shape, kernel shape)
CASES = [
    ("abc,cde->abde", (None, 3, 4), "de", (2, 5, 16), (16, 3, 4)),
    ("abcd,cde->abe", (None, 16), "e", (2, 5, 3, 4), (3, 4, 16)),
    ("btd,ndh->btnh", (None, 3, 4), None, (2, 5, 16), (3, 16, 4)),
    ("btnh,nhd->btd", (None, 16), None, (2, 5, 3, 4), (3, 4, 16)),
    ("bqd,dhk->bhqk", (3, None, 4), "hk", (2, 5, 16), (16, 3, 4)),
    ("...b,bc->...c", (12,), "c", (2, 3, 16), (16, 12)),
    ("...b,bc->...c", (12,), None, (3, 16), (16, 12)),
]


def random(shape, seed, std=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * std).astype("float32")


def make_einsum(equation, output_shape, bias_axes, x_shape, seed=0, **kw):
    layer = keras.layers.EinsumDense(
        equation, output_shape, bias_axes=bias_axes, name="attn", **kw
    )
    layer.build(x_shape)
    layer.kernel.assign(random(layer.kernel.shape, seed, std=0.2))
    if layer.bias is not None:
        layer.bias.assign(random(layer.bias.shape, seed + 1))
    return layer


def dequantized_kernel(layer):
    """The layer's NF4 kernel in the equation's layout."""
    w2d = dequantize_nf4(layer.nf4_state())
    return keras.ops.convert_to_numpy(layer.plan.kernel_from_2d(w2d))


@pytest.mark.parametrize("eq, out_shape, bias_axes, x_shape, k_shape", CASES)
def test_output_equals_einsum_of_dequantized_kernel(
    eq, out_shape, bias_axes, x_shape, k_shape
):
    source = make_einsum(eq, out_shape, bias_axes, x_shape)
    assert tuple(source.kernel.shape) == k_shape
    layer = QLoRAEinsumDense.from_layer(source, rank=2, block_size=32)
    x = random(x_shape, 2)
    expected = np.einsum(eq, x, dequantized_kernel(layer))
    if bias_axes:
        expected = expected + source.bias.numpy()
    out = layer(x).numpy()
    assert out.shape == source(x).shape
    assert layer.compute_output_shape(x_shape) == out.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # The dequantized kernel is close to the float one.
    kernel = source.kernel.numpy()
    err = np.linalg.norm(dequantized_kernel(layer) - kernel)
    assert err < 0.11 * np.linalg.norm(kernel)


def test_lora_in_the_2d_view():
    # Gemma query: kernel (n, d, h), K = d, N = n * h in (n, h) order.
    source = make_einsum("btd,ndh->btnh", (None, 3, 4), None, (2, 5, 16))
    layer = QLoRAEinsumDense.from_layer(
        source, rank=3, lora_alpha=6.0, use_rslora=False
    )
    assert layer.lora_a.shape == (16, 3) and layer.lora_b.shape == (3, 12)
    a, b = random((16, 3), 3), random((3, 12), 4)
    layer.lora_a.assign(a)
    layer.lora_b.assign(b)
    x = random((2, 5, 16), 5)
    delta = 2.0 * (x.reshape(-1, 16) @ a @ b).reshape(2, 5, 3, 4)
    expected = np.einsum("btd,ndh->btnh", x, dequantized_kernel(layer)) + delta
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-4)


def test_only_lora_is_trainable():
    source = make_einsum("abc,cde->abde", (None, 3, 4), "de", (2, 5, 16))
    layer = QLoRAEinsumDense.from_layer(source, rank=2)
    assert [v.path for v in layer.trainable_variables] == [
        layer.lora_a.path,
        layer.lora_b.path,
    ]
    assert layer.bias.shape == (3, 4) and not layer.bias.trainable


def test_mixed_bfloat16():
    args = ("abc,cde->abde", (None, 3, 4), "de", (2, 5, 16))
    source = make_einsum(*args, dtype="mixed_bfloat16")
    layer = QLoRAEinsumDense.from_layer(source, rank=2)
    assert layer.lora_a.dtype == "float32" and layer.lora_b.dtype == "float32"
    ref = QLoRAEinsumDense.from_layer(make_einsum(*args), rank=2)
    x = random((2, 5, 16), 6)
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    expected = ref(x).numpy()
    got = np.asarray(out, np.float32)
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()


def test_config_round_trip():
    source = make_einsum(
        "abc,cde->abde", (None, 3, 4), "de", (2, 5, 16), activation="relu"
    )
    layer = QLoRAEinsumDense.from_layer(
        source, rank=2, lora_alpha=4.0, block_size=256, double_quant=False
    )
    config = layer.get_config()
    assert config["equation"] == "abc,cde->abde"
    assert config["kernel_shape"] == [16, 3, 4]
    assert config["bias_axes"] == "de"
    clone = QLoRAEinsumDense.from_config(config)
    assert clone.get_config() == config
    clone.build((None, 5, 16))
    layer.lora_b.assign(random((2, 12), 7))
    clone.set_weights(layer.get_weights())
    x = random((2, 5, 16), 8)
    np.testing.assert_array_equal(clone(x).numpy(), layer(x).numpy())
    assert np.all(layer(x).numpy() >= 0)


def test_save_and_load_own_variables():
    source = make_einsum("abcd,cde->abe", (None, 16), "e", (2, 5, 3, 4))
    layer = QLoRAEinsumDense.from_layer(source, rank=2)
    layer.lora_b.assign(random((2, 16), 9))
    store = {}
    layer.save_own_variables(store)
    fresh = QLoRAEinsumDense.from_layer(source, rank=2, quantize=False)
    fresh.load_own_variables(store)
    x = random((2, 5, 3, 4), 10)
    np.testing.assert_array_equal(fresh(x).numpy(), layer(x).numpy())
    del store["nf4_packed"]
    with pytest.raises(ValueError, match=r"'attn' .*no \['nf4_packed'\]"):
        fresh.load_own_variables(store)


@pytest.mark.parametrize(
    "equation, kernel_shape",
    [
        ("ab,abc->ac", (3, 4, 5)),
        ("abc,cd->abcd", (4, 5)),
        ("ab,cd->ad", (4, 5)),
        ("ab,bc->ac,x", (4, 5)),
        ("aab,bc->ac", (4, 5)),
    ],
)
def test_bad_equation_names_it(equation, kernel_shape):
    with pytest.raises(ValueError, match=f"'{equation}'"):
        QLoRAEinsumDense(equation, kernel_shape, rank=2)


def test_bad_bias_axes():
    with pytest.raises(ValueError, match="bias_axes may only name"):
        QLoRAEinsumDense("abc,cde->abde", (16, 3, 4), bias_axes="b")


def test_rank_errors_name_the_layer():
    source = make_einsum("abc,cde->abde", (None, 3, 4), None, (2, 5, 16))
    with pytest.raises(ValueError, match=r"Layer 'attn': rank must be <= "):
        QLoRAEinsumDense.from_layer(source, rank=13)  # N = 12
    with pytest.raises(ValueError, match="Layer 'attn': rank must be a pos"):
        QLoRAEinsumDense.from_layer(source, rank=0)


def test_from_layer_type_and_kernel_checks():
    with pytest.raises(TypeError, match="expects a keras.layers.EinsumDense"):
        QLoRAEinsumDense.from_layer(keras.layers.Dense(4))
    ints = keras.layers.EinsumDense(
        "abc,cde->abde",
        (None, 3, 4),
        dtype="int32",
        kernel_initializer="zeros",
        name="ints",
    )
    ints.build((2, 5, 16))
    with pytest.raises(TypeError, match="Layer 'ints' has a int32 kernel"):
        QLoRAEinsumDense.from_layer(ints)
    source = make_einsum("abc,cde->abde", (None, 3, 4), None, (2, 5, 16))
    kernel = source.kernel.numpy()
    kernel[0, 1, 2] = np.inf
    source.kernel.assign(kernel)
    with pytest.raises(ValueError, match="Layer 'attn': its kernel has 1 non"):
        QLoRAEinsumDense.from_layer(source)


def test_set_nf4_state_mismatch():
    layer = QLoRAEinsumDense("abc,cde->abde", (16, 3, 4), name="q")
    layer.build((None, 5, 16))
    with pytest.raises(ValueError, match=r"Layer 'q' holds .*\(16, 12\)"):
        layer.set_nf4_state(quantize_nf4(random((12, 16), 0)))


def test_input_gradient_matches_numpy():
    source = make_einsum("btd,ndh->btnh", (None, 3, 4), None, (2, 5, 16))
    layer = QLoRAEinsumDense.from_layer(source, rank=2)
    w = dequantized_kernel(layer)
    x = tf.constant(random((2, 5, 16), 11))
    dy = random((2, 5, 3, 4), 12)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x) * dy)
    dx, db = tape.gradient(loss, [x, layer.lora_b])
    expected = np.einsum("btnh,ndh->btd", dy, w)
    np.testing.assert_allclose(dx.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert {v.name for v in tape.watched_variables()} == {
        "attn/lora_a:0",
        "attn/lora_b:0",
    }
    assert np.abs(db.numpy()).max() > 0


def test_plan_is_the_einsum_plan():
    layer = QLoRAEinsumDense("bqd,dhk->bhqk", (16, 3, 4))
    assert layer.plan == plan_einsum("bqd,dhk->bhqk", (16, 3, 4))
