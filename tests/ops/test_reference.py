"""The pure keras.ops reference path (fallback and test oracle) vs numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_qlora import ops as qops
from keras_qlora.ops.reference import nf4_matmul_reference
from keras_qlora.quantizers import dequantize_nf4
from keras_qlora.quantizers import quantize_nf4


def _reference(x, *args, transpose=False):
    """The pure path with its TensorFlow gradient, whatever path is active."""
    *state, shape, block_size = args
    return qops._reference_with_gradient(
        x, tuple(state), shape, block_size, transpose
    )


def _args(state):
    return (
        state.packed,
        state.absmax,
        state.absmax_scale,
        None
        if state.absmax_offset is None
        else np.float32(state.absmax_offset),
        state.shape,
        state.block_size,
    )


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
        nf4_matmul_reference(x, *_args(state)), x @ w, rtol=1e-5, atol=1e-5
    )
    dy = rng.standard_normal((4, n)).astype("float32")
    np.testing.assert_allclose(
        nf4_matmul_reference(dy, *_args(state), transpose=True),
        dy @ w.T,
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs_keep_their_dtype(dtype):
    rng = np.random.default_rng(0)
    state = quantize_nf4(rng.standard_normal((64, 32)).astype("float32"))
    x = rng.standard_normal((4, 64)).astype("float32")
    out = nf4_matmul_reference(keras.ops.cast(x, dtype), *_args(state))
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
        y = _reference(x, *_args(state))
    grad = tape.gradient(y, x, output_gradients=tf.constant(dy))
    np.testing.assert_allclose(
        grad, nf4_matmul_reference(dy, *_args(state), transpose=True), atol=1e-5
    )


def test_zero_rows():
    state = quantize_nf4(np.ones((8, 4), "float32"))
    out = nf4_matmul_reference(np.zeros((0, 8), "float32"), *_args(state))
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
    args = list(_args(state))
    args[2] = absmax_scale

    @tf.function
    def grad_x(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = _reference(x, *args)
        return tape.gradient(y, x)

    x = tf.constant(rng.standard_normal((3, 64)).astype("float32"))
    graph = grad_x.get_concrete_function(x).graph
    shifts = [op for op in graph.get_operations() if op.type == "RightShift"]
    assert len(shifts) == 2
    with tf.GradientTape() as tape:
        y = _reference(x, *args)
    assert tape.gradient(y, absmax_scale) is None
    np.testing.assert_allclose(
        grad_x(x), np.ones((3, 32)) @ dequantize_nf4(state).T, atol=1e-4
    )


@pytest.mark.parametrize(
    "position, bad, message",
    [
        (0, np.zeros((2, 8), "int32"), "x must have dtype"),
        (1, np.zeros(16, "float32"), "packed must have dtype"),
        (2, np.zeros(1, "int8"), "absmax must have dtype"),
        (3, np.zeros(1, "float64"), "absmax_scale must have dtype"),
    ],
)
def test_entry_point_rejects_wrong_dtypes(position, bad, message):
    state = quantize_nf4(np.ones((8, 4), "float32"))
    args = [np.ones((2, 8), "float32"), *_args(state)]
    args[position] = bad
    with pytest.raises(TypeError, match=message):
        qops.nf4_matmul(*args)
