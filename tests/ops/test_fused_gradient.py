"""The fused op's registered gradient, and layers on fused vs pure paths."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_qlora import ops as qops
from keras_qlora.ops import fused
from keras_qlora.ops import loader
from keras_qlora.layers import QLoRADense
from keras_qlora.layers import QLoRAEinsumDense
from keras_qlora.quantizers import quantize_nf4


@pytest.fixture(scope="module")
def lib():
    lib = qops.fused_library()
    if lib is None:
        pytest.fail(f"fused op unavailable: {qops.active_path()}")
    return lib


def _weight(k, n, double_quant=True, seed=0):
    rng = np.random.default_rng(seed)
    state = quantize_nf4(
        rng.standard_normal((k, n)).astype("float32"), 32, double_quant
    )
    weight = qops.NF4Tensors.from_state(state)
    return weight.replace_arrays(
        None if t is None else tf.constant(t) for t in weight.arrays()
    )


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("double_quant", [True, False])
def test_compute_gradient_of_the_fused_op(lib, transpose, double_quant):
    weight = _weight(37, 11, double_quant)
    width = 11 if transpose else 37
    x = tf.constant(
        np.random.default_rng(1).standard_normal((3, width)), tf.float32
    )

    def f(inputs):
        return qops.nf4_matmul(inputs, weight, transpose=transpose)

    theoretical, numerical = tf.test.compute_gradient(f, [x], delta=1e-2)
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=2e-2)


def test_gradient_inside_tf_function_uses_the_transposed_op(lib):
    weight = _weight(64, 24)
    x = tf.constant(np.ones((2, 64), "float32"))

    @tf.function
    def grad(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            y = qops.nf4_matmul(inputs, weight)
        return tape.gradient(y, inputs)

    graph = grad.get_concrete_function(x).graph
    fused = [op for op in graph.get_operations() if op.type == qops.OP_TYPE]
    assert [op.get_attr("transpose") for op in fused] == [False, True]
    expected = qops.nf4_matmul(np.ones((2, 24), "float32"), weight, True)
    np.testing.assert_allclose(grad(x), expected, rtol=1e-5, atol=1e-5)


def _pure(monkeypatch):
    monkeypatch.setattr(fused, "fused_library", lambda: None)
    monkeypatch.setattr(loader._state, "warned", True)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_layers_agree_on_fused_and_pure_paths(lib, monkeypatch, policy):
    dense = keras.layers.Dense(24, dtype=policy)
    dense.build((None, 40))
    einsum = keras.layers.EinsumDense(
        "abc,cde->abde", (5, 4, 6), bias_axes="de", dtype=policy
    )
    einsum.build((None, 5, 40))
    layers = [
        QLoRADense.from_layer(dense, rank=4),
        QLoRAEinsumDense.from_layer(einsum, rank=4),
    ]
    for layer in layers:
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.1, "float32"))
    x = np.random.default_rng(2).standard_normal((2, 5, 40)).astype("float32")
    fused = [keras.ops.convert_to_numpy(layer(x)) for layer in layers]
    _pure(monkeypatch)
    pure = [keras.ops.convert_to_numpy(layer(x)) for layer in layers]
    tol = 1e-5 if policy == "float32" else 5e-2
    for a, b in zip(fused, pure, strict=True):
        np.testing.assert_allclose(
            a.astype("float32"), b.astype("float32"), rtol=tol, atol=tol
        )
