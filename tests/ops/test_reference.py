"""The pure keras.ops reference path (fallback and test oracle) vs numpy."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_qlora import ops as qops
from keras_qlora.ops import fused
from keras_qlora.ops import NF4Tensors
from keras_qlora.ops.reference import nf4_matmul_reference
from keras_qlora.quantizers import dequantize_nf4
from keras_qlora.quantizers import quantize_nf4


def _reference(x, weight, transpose=False):
    """The pure path with its TensorFlow gradient, whatever path is active."""
    return fused._reference_with_gradient(x, weight, transpose)


def _weight(state, **changes):
    """The state as the op wrapper takes it, with some arrays replaced."""
    return dataclasses.replace(NF4Tensors.from_state(state), **changes)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(
    "k, n, block", [(37, 19, 32), (130, 64, 64), (5, 3, 256)]
)
def test_matmul_and_transpose_match_numpy(k, n, block, double_quant):
    rng = np.random.default_rng(k * n)
    state = quantize_nf4(
        rng.standard_normal((k, n)).astype("float32"), block, double_quant
    )
    w = dequantize_nf4(state)
    x = rng.standard_normal((2, 3, k)).astype("float32")
    np.testing.assert_allclose(
        nf4_matmul_reference(x, _weight(state)), x @ w, rtol=1e-5, atol=1e-5
    )
    dy = rng.standard_normal((4, n)).astype("float32")
    np.testing.assert_allclose(
        nf4_matmul_reference(dy, _weight(state), transpose=True),
        dy @ w.T,
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs_keep_their_dtype(dtype):
    rng = np.random.default_rng(0)
    state = quantize_nf4(rng.standard_normal((64, 32)).astype("float32"))
    x = rng.standard_normal((4, 64)).astype("float32")
    out = nf4_matmul_reference(keras.ops.cast(x, dtype), _weight(state))
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    ref = x @ dequantize_nf4(state)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")),
        ref,
        rtol=0.05,
        atol=0.15,
    )


def test_input_gradient_is_the_transposed_product():
    rng = np.random.default_rng(1)
    state = quantize_nf4(rng.standard_normal((48, 24)).astype("float32"))
    x = tf.constant(rng.standard_normal((5, 48)).astype("float32"))
    dy = rng.standard_normal((5, 24)).astype("float32")
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = _reference(x, _weight(state))
    grad = tape.gradient(y, x, output_gradients=tf.constant(dy))
    expected = nf4_matmul_reference(dy, _weight(state), transpose=True)
    np.testing.assert_allclose(grad, expected, atol=1e-5)


def test_zero_rows():
    state = quantize_nf4(np.ones((8, 4), "float32"))
    out = nf4_matmul_reference(np.zeros((0, 8), "float32"), _weight(state))
    assert tuple(out.shape) == (0, 4)


def test_active_path_is_reported():
    name, reason = qops.active_path()
    assert name in ("fused", "reference") and reason


def test_backward_dequantizes_again_instead_of_keeping_the_float_kernel():
    """Gradient graph: one dequantization forward, one more backward.

    Plain autodiff of dequantize-then-matmul would save the float kernel
    from the forward pass (one dequantization in the whole graph) and keep
    K * N floats per layer alive until the backward pass.
    """
    rng = np.random.default_rng(2)
    state = quantize_nf4(rng.standard_normal((64, 32)).astype("float32"))
    absmax_scale = tf.Variable(state.absmax_scale)
    weight = _weight(state, absmax_scale=absmax_scale)

    @tf.function
    def grad_x(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = _reference(x, weight)
        return tape.gradient(y, x)

    x = tf.constant(rng.standard_normal((3, 64)).astype("float32"))
    graph = grad_x.get_concrete_function(x).graph
    shifts = [op for op in graph.get_operations() if op.type == "RightShift"]
    assert len(shifts) == 2
    with tf.GradientTape() as tape:
        y = _reference(x, weight)
    assert tape.gradient(y, absmax_scale) is None
    np.testing.assert_allclose(
        grad_x(x), np.ones((3, 32)) @ dequantize_nf4(state).T, atol=1e-4
    )


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("x", np.zeros((2, 8), "int32"), "x must have dtype"),
        ("packed", np.zeros(16, "float32"), "packed must have dtype"),
        ("absmax", np.zeros(1, "int8"), "absmax must have dtype"),
        ("absmax_scale", np.zeros(1, "float64"), "absmax_scale must have"),
    ],
)
def test_entry_point_rejects_wrong_dtypes(name, bad, message):
    state = quantize_nf4(np.ones((8, 4), "float32"))
    x = np.ones((2, 8), "float32")
    if name == "x":
        x, weight = bad, _weight(state)
    else:
        weight = _weight(state, **{name: bad})
    with pytest.raises(TypeError, match=message):
        qops.nf4_matmul(x, weight)


def test_entry_point_takes_the_weight_as_one_object():
    state = quantize_nf4(np.ones((8, 4), "float32"))
    x = np.ones((2, 8), "float32")
    np.testing.assert_allclose(
        qops.nf4_matmul(x, state), qops.nf4_matmul(x, _weight(state))
    )
    with pytest.raises(TypeError, match="weight must be an NF4Tensors"):
        qops.nf4_matmul(x, state.packed)
