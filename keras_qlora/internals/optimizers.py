"""Optimizer steps and tf.distribute. See the package docstring."""

import contextlib

from keras_qlora.internals._base import attr
from keras_qlora.internals._base import private

# -- optimizers (training/adam8bit.py, training/offload.py) -------------------


class OptimizerStepHooks:
    """Mixin for `keras.optimizers.Optimizer` subclasses (TensorFlow
    backend, Keras 3.15 `TFOptimizer._backend_update_step` and
    `_distributed_tf_update_step`). List it before the optimizer base.

    `update_step_scope()` is entered around each step's update of all
    variables; `batched_update(grads_and_vars, learning_rate)` may update
    them all at once and return True, or return False to let Keras update
    one variable at a time.
    """

    def update_step_scope(self):
        return contextlib.nullcontext()

    def batched_update(self, grads_and_vars, learning_rate) -> bool:
        return False

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        with self.update_step_scope():
            super()._backend_update_step(
                grads, trainable_variables, learning_rate
            )

    def _distributed_tf_update_step(
        self, distribution, grads_and_vars, learning_rate
    ):
        if self.batched_update(grads_and_vars, learning_rate):
            return None
        return super()._distributed_tf_update_step(
            distribution, grads_and_vars, learning_rate
        )


def variable_index(optimizer, variable) -> int:
    """The position of `variable` in the list the optimizer was built with
    (Keras 3.15 `Optimizer._get_variable_index`)."""
    function = attr(
        optimizer,
        "_get_variable_index",
        "Keras' Optimizer._get_variable_index()",
    )
    return function(variable)


def learning_rate_setting(optimizer):
    """The learning rate as given: a float variable, or the schedule or
    callable itself (Keras 3.15 `Optimizer._learning_rate`)."""
    return attr(optimizer, "_learning_rate", "Keras' Optimizer._learning_rate")


def overwrites_with_gradient(optimizer, variable) -> bool:
    """Whether the optimizer assigns the gradient to `variable` instead of
    updating it (float8 scale variables; Keras 3.15
    `Optimizer._overwrite_variable_with_gradient`)."""
    function = attr(
        optimizer,
        "_overwrite_variable_with_gradient",
        "Keras' Optimizer._overwrite_variable_with_gradient()",
    )
    return function(variable)


def optimizer_strategy(optimizer):
    """The tf.distribute strategy the optimizer was created under, None
    where it has none (Keras 3.15 `TFOptimizer._distribution_strategy`)."""
    return getattr(optimizer, "_distribution_strategy", None)


def optimizer_own_variables(optimizer) -> list:
    """The variables the optimizer itself created (iterations, learning
    rate, `add_variable`), the list itself (Keras 3.15
    `Optimizer._variables`)."""
    return attr(optimizer, "_variables", "Keras' Optimizer._variables")


# -- tf.distribute (training/multi_worker.py, layers/frozen_state.py) ---------


def num_workers(strategy) -> int:
    """The number of workers a strategy spans; 1 for strategies that do not
    say (TF 2.21 `CollectiveAllReduceExtended._num_workers`)."""
    return getattr(strategy.extended, "_num_workers", 1)


def local_resource_variable(initial_value, name, dtype, shape):
    """A frozen `tf.Variable` made directly, skipping every variable creator
    (a strategy's broadcast included; TF 2.21
    `tensorflow.python.ops.resource_variable_ops.ResourceVariable`)."""
    variable_class = private(
        "tensorflow.python.ops.resource_variable_ops",
        "ResourceVariable",
        "TensorFlow's ResourceVariable class",
    )
    return variable_class(
        initial_value=initial_value,
        trainable=False,
        name=name,
        dtype=dtype,
        shape=shape,
    )
