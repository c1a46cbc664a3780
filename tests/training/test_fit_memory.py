"""What `fit` keeps in memory beyond the training tensors.

Measured with benchmarks/fit_growth.py (docs/performance.md): the traced
train step's graph costs ~8 KB of RSS per node for as long as it lives, and
glibc keeps the heap that the first step (tracing, Grappler, kernel
instantiation) frees. These tests check the two fixes by behaviour: the
8-bit optimizer's update adds few nodes per variable and gives the same
values as the per-variable update; the train function hands the heap back
once, after its first call.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_qlora
from keras_qlora import convert
from keras_qlora.training import adam8bit
from keras_qlora.training.adam8bit import AdamW8bit

# Mixed: 8-bit variables (>= min_8bit_size) with and without a partial last
# block, float-moment variables of several ranks.
_SHAPES = [(300, 17), (64, 64), (5,), (4096,), (8, 1000), (70, 70), (3, 4)]


def _train(fused, steps=3, shapes=_SHAPES, **kwargs):
    rng = np.random.default_rng(0)
    variables = [
        keras.Variable(rng.standard_normal(s).astype("float32"))
        for s in shapes
    ]
    opt = AdamW8bit(1e-2, block_size=256, min_8bit_size=4096, **kwargs)
    opt._fused_update_enabled = fused
    opt.build(variables)

    @tf.function
    def step(grads):
        opt.apply(grads, variables)

    for _ in range(steps):
        step(
            [
                tf.constant(rng.standard_normal(s).astype("float32"))
                for s in shapes
            ]
        )
    graph = step.get_concrete_function(
        [tf.TensorSpec(s) for s in shapes]
    ).graph.as_graph_def()
    values = [v.numpy() for v in variables + list(opt.variables)]
    return values, len(graph.node)


@pytest.mark.parametrize("group_size", [1 << 20, 5000])
def test_fused_update_equals_per_variable_update(monkeypatch, group_size):
    # 5000 values per group splits the variables into several groups.
    monkeypatch.setattr(adam8bit, "_FUSED_GROUP_SIZE", group_size)
    fused, _ = _train(True)
    single, _ = _train(False)
    assert len(fused) == len(single)
    for a, b in zip(fused, single, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fused_update_equals_plain_adam_without_weight_decay():
    fused, _ = _train(True, weight_decay=None)
    single, _ = _train(False, weight_decay=None)
    for a, b in zip(fused, single, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fused_update_adds_few_graph_nodes_per_variable():
    few = [(64, 64)] * 4 + [(8, 100)] * 4
    many = few * 4
    _, fused_few = _train(True, steps=1, shapes=few)
    _, fused_many = _train(True, steps=1, shapes=many)
    _, single_few = _train(False, steps=1, shapes=few)
    _, single_many = _train(False, steps=1, shapes=many)
    fused_per_var = (fused_many - fused_few) / (len(many) - len(few))
    single_per_var = (single_many - single_few) / (len(many) - len(few))
    # Measured: ~30 vs ~75 (float moments) / ~100 (8-bit) per variable.
    assert fused_per_var < 0.5 * single_per_var
    assert fused_per_var < 40


def test_fused_update_off_under_a_distribution_strategy():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        variables = [keras.Variable(np.ones((64, 64), "float32"))] * 1
        opt = AdamW8bit(1e-2, min_8bit_size=0)
        opt.build(variables)
    calls = []
    original = AdamW8bit._fused_update_step

    def spy(self, *args):
        calls.append(True)
        return original(self, *args)

    AdamW8bit._fused_update_step = spy
    try:
        strategy.run(
            tf.function(lambda: opt.apply([tf.ones((64, 64))], variables))
        )
    finally:
        AdamW8bit._fused_update_step = original
    assert not calls
    assert not np.allclose(variables[0].numpy(), 1.0)


def _qlora_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((24,)),
            keras.layers.Dense(64, activation="gelu", name="query"),
            keras.layers.Dense(8, name="head"),
        ]
    )
    return keras_qlora.apply(
        model, rank=4, optimizer_8bit=True, verbose=False
    )


def test_train_function_trims_heap_once_after_first_step(monkeypatch):
    model = _qlora_model()
    calls = []
    monkeypatch.setattr(
        convert, "release_free_memory", lambda: calls.append(True) or True
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 24)).astype("float32")
    y = rng.standard_normal((64, 8)).astype("float32")
    model.compile(optimizer="adamw", loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert len(calls) == 1
    first = model.train_function
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.train_on_batch(x[:8], y[:8])
    # Same function, not wrapped again, not trimmed again.
    assert model.train_function is first
    assert len(calls) == 1
    # A new train function (recompile) trims once more.
    model.compile(optimizer="adamw", loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert len(calls) == 2


def test_trimming_train_function_returns_the_step_logs():
    model = _qlora_model()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 24)).astype("float32")
    y = rng.standard_normal((16, 8)).astype("float32")
    model.compile(optimizer="adamw", loss="mse")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    logs = model.train_on_batch(x[:8], y[:8], return_dict=True)
    assert set(logs) == {"loss"}
