"""The Keras / TensorFlow / keras_hub behaviour `keras_qlora.internals`
uses: The call context (remat), deferred variables and the train step.

One test per function; each failure names the behaviour that changed and
the function of keras_qlora/internals/ to update.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_qlora import internals

from ._support import Outer
from ._support import changed
from ._support import functional

# -- remat: call context ----------------------------------------------------


def test_remat_mode():
    with keras.RematScope(mode="full"):
        inside = keras.layers.Dense(2)
    message = changed(
        "remat_mode",
        "keras.RematScope no longer marks the layers created in it with "
        "Layer._remat_mode (a RematMode with .mode)",
    )
    assert internals.remat_mode(inside) == "full", message
    assert internals.remat_mode(keras.layers.Dense(2)) is None, message


def test_layer_seed_generators():
    dropout = keras.layers.Dropout(0.5)
    outer = Outer()
    outer.drop = keras.layers.Dropout(0.5)
    generators = internals.layer_seed_generators(dropout)
    message = changed(
        "layer_seed_generators",
        "Layer._seed_generators no longer lists the SeedGenerators a layer "
        "owns (each with a .state variable)",
    )
    assert len(generators) == 1, message
    assert isinstance(generators[0], keras.random.SeedGenerator), message
    assert isinstance(generators[0].state, keras.Variable), message
    assert internals.layer_seed_generators(outer) == [], message


def test_global_seed_generator():
    keras.random.normal((2,))  # an unseeded op makes the global generator
    assert isinstance(
        internals.global_seed_generator(), keras.random.SeedGenerator
    ), changed(
        "global_seed_generator",
        "unseeded random ops no longer draw from the global attribute "
        "'global_seed_generator'",
    )


def test_get_keras_mask():
    embedding = keras.layers.Embedding(5, 2, mask_zero=True)
    out = embedding(np.array([[1, 0]]))
    mask = internals.get_keras_mask(out)
    assert mask is not None and mask.numpy().tolist() == [[True, False]], (
        changed(
            "get_keras_mask",
            "Keras no longer attaches masks to eager tensors where "
            "keras.src.backend.get_keras_mask reads them",
        )
    )


def test_set_keras_mask():
    x = tf.ones((1, 2))
    internals.set_keras_mask(x, tf.constant([[True, False]]))
    message = changed(
        "set_keras_mask",
        "a mask set by keras.src.backend.set_keras_mask is no longer read back",
    )
    assert internals.get_keras_mask(x).numpy().tolist() == [[True, False]], (
        message
    )


class _Recorder(keras.layers.Layer):
    """Records the call context and autocast dtype seen by its call."""

    def call(self, x, training=None):
        self.values = internals.call_context_values()
        self.dtype_seen = internals.autocast_dtype()
        return x


def test_autocast_dtype():
    recorder = _Recorder(dtype="mixed_bfloat16")
    recorder(np.ones((1, 2), "float32"))
    message = changed(
        "autocast_dtype",
        "a mixed-precision layer's call no longer runs under the global "
        "'autocast_scope' (an AutocastScope with .dtype)",
    )
    assert recorder.dtype_seen == "bfloat16", message
    assert internals.autocast_dtype() is None, message


def test_call_context_values():
    recorder = _Recorder()
    recorder(np.ones((1, 2), "float32"), training=True)
    message = changed(
        "call_context_values",
        "the global 'current_call_ctx' (CallContext) no longer holds the "
        "call's `training` as an attribute",
    )
    assert recorder.values.get("training") is True, message
    assert "entry_layer" not in recorder.values, message


def test_call_context():
    layer = keras.layers.Dense(2)
    dropout = keras.layers.Dropout(0.5, seed=1)
    variable = keras.Variable(np.ones((2,), "float32"))
    with internals.call_context(layer, {"training": True}, "float16"):
        dropped = dropout(np.ones((1, 100), "float32"))
        read = variable.value
    message = changed(
        "call_context",
        "sublayers no longer take `training` from a CallContext set as "
        "'current_call_ctx', or AutocastScope no longer casts reads",
    )
    assert (dropped.numpy() == 0).any(), message
    assert read.dtype == tf.float16, message
    after = dropout(np.ones((1, 100), "float32"))
    assert not (after.numpy() == 0).any(), message
    assert internals.call_context_values() == {}, message


# -- deferred variables -----------------------------------------------------


@pytest.fixture
def deferred_variable():
    before = list(internals.uninitialized_variables())
    with keras.StatelessScope(initialize_variables=False):
        variable = keras.Variable(initializer="ones", shape=(2,))
    yield variable, before
    internals.set_uninitialized_variables(before)


def test_uninitialized_variables(deferred_variable):
    variable, before = deferred_variable
    registry = internals.uninitialized_variables()
    assert any(v is variable for v in registry), changed(
        "uninitialized_variables",
        "variables made in StatelessScope(initialize_variables=False) are "
        "no longer registered in 'uninitialized_variables'",
    )
    assert len(registry) == len(before) + 1


def test_set_uninitialized_variables(deferred_variable):
    variable, before = deferred_variable
    internals.set_uninitialized_variables(before)
    assert not any(
        v is variable for v in internals.uninitialized_variables()
    ), changed(
        "set_uninitialized_variables",
        "global attribute 'uninitialized_variables' is not the registry",
    )


def test_is_deferred_variable(deferred_variable):
    variable, _ = deferred_variable
    message = changed(
        "is_deferred_variable",
        "a deferred Variable no longer has _value None until initialized",
    )
    assert internals.is_deferred_variable(variable), message
    assert not internals.is_deferred_variable(keras.Variable(1.0)), message


def test_initialize_deferred_variable(deferred_variable):
    variable, _ = deferred_variable
    internals.initialize_deferred_variable(variable)
    message = changed(
        "initialize_deferred_variable",
        "Variable._deferred_initialize() no longer allocates the value",
    )
    assert not internals.is_deferred_variable(variable), message
    np.testing.assert_array_equal(variable.numpy(), [1.0, 1.0], message)


# -- train step ---------------------------------------------------------------


def _compiled_model():
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(
        1, kernel_regularizer=keras.regularizers.L2(0.1)
    )(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_compute_loss():
    model = _compiled_model()
    x = np.ones((4, 3), "float32")
    y = np.zeros((4, 1), "float32")
    y_pred = model(x)
    loss = internals.compute_loss(model, x, y, y_pred, None, True)
    mse = keras.losses.mean_squared_error(y, y_pred)
    want = float(np.mean(mse)) + float(sum(model.losses))
    np.testing.assert_allclose(
        float(loss),
        want,
        rtol=1e-5,
        err_msg=changed(
            "compute_loss",
            "Trainer._compute_loss(x, y, y_pred, sample_weight, training) "
            "is no longer the compiled loss plus model.losses",
        ),
    )


def test_track_loss():
    model = _compiled_model()
    internals.track_loss(model, tf.constant(2.0), batch_size=4)
    internals.track_loss(model, tf.constant(4.0), batch_size=4)
    metrics = {m.name: m for m in model.metrics}
    np.testing.assert_allclose(
        float(metrics["loss"].result()),
        3.0,
        err_msg=changed(
            "track_loss",
            "Trainer._loss_tracker is no longer the 'loss' metric of "
            "model.metrics",
        ),
    )


def test_turn_off_jit_compile():
    model, _ = functional()
    internals.turn_off_jit_compile(model)
    message = changed(
        "turn_off_jit_compile",
        "Trainer._jit_compile no longer backs model.jit_compile (None until "
        "'auto' is resolved)",
    )
    assert vars(model)["_jit_compile"] is None, message
    model.jit_compile = True
    assert model.jit_compile is True, message
    internals.turn_off_jit_compile(model)
    assert model.jit_compile is False, message


def test_symbolic_build_hook():
    class Hooked(internals.SymbolicBuildHook, keras.Model):
        seen = []

        def before_symbolic_build(self, iterator, data_batch):
            self.seen.append((iterator is not None, data_batch))
            return iterator, data_batch

    inputs = keras.Input((3,))
    model = Hooked(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 3)), np.ones((4, 1)), epochs=1, verbose=0)
    assert Hooked.seen == [(True, None)], changed(
        "SymbolicBuildHook",
        "fit() no longer calls Trainer._maybe_symbolic_build(iterator=..., "
        "data_batch=None) before the first step",
    )


def test_optimizer_step_hooks():
    class Hooked(internals.OptimizerStepHooks, keras.optimizers.SGD):
        batched = False
        calls = []

        def update_step_scope(self):
            self.calls.append("scope")
            return super().update_step_scope()

        def batched_update(self, grads_and_vars, learning_rate):
            pairs = list(grads_and_vars)
            self.calls.append(("batched", len(pairs)))
            if not self.batched:
                return False
            for grad, var in pairs:
                var.assign_sub(grad)
            return True

    variable = keras.Variable(np.ones((2,), "float32"))
    optimizer = Hooked(learning_rate=0.5)
    optimizer.apply([tf.ones((2,))], [variable])
    message = changed(
        "OptimizerStepHooks",
        "TFOptimizer.apply no longer goes through _backend_update_step -> "
        "_distributed_tf_update_step(distribution, grads_and_vars, lr)",
    )
    assert Hooked.calls == ["scope", ("batched", 1)], message
    np.testing.assert_allclose(variable.numpy(), [0.5, 0.5], err_msg=message)
    Hooked.batched = True
    optimizer.apply([tf.ones((2,))], [variable])
    np.testing.assert_allclose(variable.numpy(), [-0.5, -0.5], err_msg=message)
