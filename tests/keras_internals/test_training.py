"""The Keras / TensorFlow / keras_hub behaviour `keras_qlora.internals`
uses: Optimizer steps and tf.distribute.

One test per function; each failure names the behaviour that changed and
the function of keras_qlora/internals/ to update.
"""

import inspect

import keras
import numpy as np
import tensorflow as tf

from keras_qlora import internals

from ._support import built_sgd
from ._support import changed

# -- optimizers ---------------------------------------------------------------


def test_variable_index():
    first = keras.Variable(np.zeros((2,), "float32"))
    second = keras.Variable(np.zeros((3,), "float32"))
    optimizer = built_sgd(first, second)
    message = changed(
        "variable_index",
        "Optimizer._get_variable_index no longer maps a variable (or its "
        "tf.Variable) to its build() position",
    )
    assert internals.variable_index(optimizer, second) == 1, message
    assert internals.variable_index(optimizer, second.value) == 1, message


def test_learning_rate_setting():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    message = changed(
        "learning_rate_setting",
        "Optimizer._learning_rate no longer holds the schedule as given",
    )
    with_schedule = keras.optimizers.Adam(learning_rate=schedule)
    assert internals.learning_rate_setting(with_schedule) is schedule, message
    plain = keras.optimizers.Adam(learning_rate=0.1)
    assert isinstance(internals.learning_rate_setting(plain), keras.Variable)


def test_overwrites_with_gradient():
    normal = keras.Variable(np.zeros((2,), "float32"))
    scale = keras.Variable(np.zeros((2,), "float32"))
    scale.overwrite_with_gradient = True
    optimizer = built_sgd(normal, scale)
    message = changed(
        "overwrites_with_gradient",
        "Optimizer._overwrite_variable_with_gradient no longer reads "
        "Variable.overwrite_with_gradient",
    )
    assert not internals.overwrites_with_gradient(optimizer, normal), message
    assert internals.overwrites_with_gradient(optimizer, scale), message


def test_optimizer_strategy():
    strategy = internals.optimizer_strategy(keras.optimizers.SGD())
    message = changed(
        "optimizer_strategy",
        "TFOptimizer._distribution_strategy is no longer the strategy the "
        "optimizer was made under",
    )
    assert strategy is tf.distribute.get_strategy(), message
    assert callable(strategy.extended.colocate_vars_with), message


def test_optimizer_own_variables():
    variable = keras.Variable(np.zeros((2,), "float32"))
    optimizer = built_sgd(variable, momentum=0.9)
    own = internals.optimizer_own_variables(optimizer)
    message = changed(
        "optimizer_own_variables",
        "Optimizer._variables no longer holds every variable the optimizer "
        "made (Optimizer.variables)",
    )
    assert [id(v) for v in own] == [id(v) for v in optimizer.variables], message
    assert any(v is optimizer.iterations for v in own), message


# -- tf.distribute ------------------------------------------------------------


def test_num_workers():
    from tensorflow.python.distribute import collective_all_reduce_strategy

    source = inspect.getsource(
        collective_all_reduce_strategy.CollectiveAllReduceExtended
    )
    message = changed(
        "num_workers",
        "CollectiveAllReduceExtended (MultiWorkerMirroredStrategy) no "
        "longer sets _num_workers",
    )
    assert "self._num_workers =" in source, message
    assert internals.num_workers(tf.distribute.get_strategy()) == 1, message


def test_local_resource_variable():
    seen = []

    def creator(next_creator, **kwargs):
        seen.append(kwargs.get("name"))
        return next_creator(**kwargs)

    with tf.variable_creator_scope(creator):
        variable = internals.local_resource_variable(
            initial_value=np.zeros((3,), "uint8"),
            name="codes",
            dtype=tf.uint8,
            shape=(3,),
        )
    message = changed(
        "local_resource_variable",
        "ResourceVariable(...) made directly no longer skips variable creators",
    )
    assert seen == [], message
    assert isinstance(variable, tf.Variable) and not variable.trainable
    assert variable.dtype == tf.uint8, message
