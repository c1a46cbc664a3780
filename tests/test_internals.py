"""The Keras / TensorFlow / keras_hub behaviour `keras_qlora.internals` uses.

One test per function of `keras_qlora/internals.py`. Each asserts the
behaviour keras_qlora relies on, and its failure message names the
behaviour that changed and the function to update: after a Keras upgrade,
this file says what to fix. The last tests check that no private
Keras/TF name is used anywhere else in the package.
"""

import ast
import inspect
import io
import pathlib
import re
import tokenize

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_qlora import internals

_PACKAGE = pathlib.Path(internals.__file__).parent


def _changed(function, behaviour):
    return (
        f"Keras/TF behaviour changed: {behaviour}. Update "
        f"keras_qlora.internals.{function} (and check the pinned range in "
        "setup.cfg)."
    )


def _functional(units=2):
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(units, name="dense")
    outputs = keras.layers.Dense(1, name="head")(dense(inputs))
    return keras.Model(inputs, outputs), dense


class _Outer(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(2, name="first")
        self.second = keras.layers.Dense(2, name="second")

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones", name="s")
        self.first.build(input_shape)
        self.second.build((None, 2))

    def call(self, x):
        return self.second(self.first(x)) * self.scale


def _built_outer():
    outer = _Outer()
    outer.build((None, 3))
    return outer


# -- the error for a missing internal ------------------------------------


def test_missing_internal_raises_keras_internals_changed():
    with pytest.raises(
        internals.KerasInternalsChanged,
        match=r"keras_qlora needs Keras' Layer\._nope.*setup\.cfg",
    ):
        internals._attr(keras.layers.Dense(1), "_nope", "Keras' Layer._nope")
    with pytest.raises(
        internals.KerasInternalsChanged, match=r"keras\.src\.nowhere\.thing"
    ):
        internals._private("keras.src.nowhere", "thing", "Keras' thing")


# -- graphs -----------------------------------------------------------------


def test_is_bookkeeping_attr():
    model, _ = _functional()
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    for owner in (model, sequential):
        for key, value in vars(owner).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            layers = [v for v in values if isinstance(v, keras.layers.Layer)]
            if key.startswith("_") and layers:
                assert internals.is_bookkeeping_attr(key), _changed(
                    "is_bookkeeping_attr",
                    f"{type(owner).__name__} holds layers in a new private "
                    f"attribute {key!r}",
                )
    assert internals.is_bookkeeping_attr("_inbound_nodes")
    assert not internals.is_bookkeeping_attr("transformer_layers")


def test_is_functional():
    import keras_hub

    model, _ = _functional()
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=20,
        num_layers=1,
        num_heads=1,
        hidden_dim=4,
        intermediate_dim=4,
        max_sequence_length=4,
    )
    message = _changed(
        "is_functional",
        "keras.Model(inputs, outputs) / keras_hub backbones are no longer "
        "keras.src.models.functional.Functional",
    )
    assert internals.is_functional(model), message
    assert internals.is_functional(backbone), message
    assert not internals.is_functional(keras.Sequential([])), message
    assert not internals.is_functional(keras.layers.Dense(1)), message


def test_sequential_layers():
    dense = keras.layers.Dense(2)
    model = keras.Sequential([keras.Input((3,)), dense])
    layers = internals.sequential_layers(model)
    message = _changed(
        "sequential_layers",
        "Sequential._layers is not the list (InputLayer first) the model "
        "reads its layers from",
    )
    assert isinstance(layers[0], keras.layers.InputLayer), message
    assert layers[1] is dense, message
    assert internals.sequential_layers(model) is layers, message


def test_rebuild_sequential():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    new = keras.layers.Dense(4)
    layers = internals.sequential_layers(model)
    layers[1] = new
    internals.rebuild_sequential(model)
    out = model(np.ones((1, 3), "float32"))
    message = _changed(
        "rebuild_sequential",
        "Sequential._maybe_rebuild() does not rebuild from Sequential._layers",
    )
    assert model.layers == [new], message
    assert tuple(out.shape) == (1, 4), message


def test_inbound_nodes():
    model, dense = _functional()
    nodes = internals.inbound_nodes(dense)
    message = _changed(
        "inbound_nodes",
        "Operation._inbound_nodes no longer lists the calls of a layer in a "
        "Functional graph, each node with input_tensors",
    )
    assert len(nodes) == 1, message
    assert tuple(nodes[0].input_tensors[0].shape) == (None, 3), message
    assert internals.inbound_nodes(keras.layers.Dense(1)) == [], message


def test_move_graph_nodes():
    model, old = _functional()
    new = keras.layers.Dense(2, name="new")
    new.build((None, 3))
    internals.move_graph_nodes(old, new)
    nodes = internals.inbound_nodes(new)
    message = _changed(
        "move_graph_nodes",
        "graph nodes (Node.operation, KerasTensor._keras_history) no longer "
        "follow the layer moved into them",
    )
    assert len(nodes) == 1 and nodes[0].operation is new, message
    assert nodes[0].outputs[0]._keras_history.operation is new, message
    assert internals.inbound_nodes(old) == [], message


def test_recompute_functional_graph():
    model, old = _functional()
    new = keras.layers.Dense(2, name="new")
    new.build((None, 3))
    internals.move_graph_nodes(old, new)
    internals.recompute_functional_graph(model)
    x = np.ones((2, 3), "float32")
    head = model.get_layer("head")
    message = _changed(
        "recompute_functional_graph",
        "map_graph() / Function._nodes, _operations (by depth) no longer "
        "define which layers a Functional model runs",
    )
    assert new in model.layers and old not in model.layers, message
    np.testing.assert_allclose(
        model(x), head(new(x)), rtol=1e-6, err_msg=message
    )


# -- state tracking ---------------------------------------------------------


def test_replace_tracked_layer():
    outer = _built_outer()
    new = keras.layers.Dense(2, name="new")
    new.build((None, 3))
    internals.replace_tracked_layer(outer, outer.first, new)
    message = _changed(
        "replace_tracked_layer",
        "Layer._tracker.replace_tracked_value no longer keeps the weight "
        "order of a built layer",
    )
    want = [outer.scale, *new.weights, *outer.second.weights]
    assert [id(v) for v in outer.weights] == [id(v) for v in want], message
    # A layer already tracked: the old one is untracked instead.
    internals.replace_tracked_layer(outer, outer.second, new)
    assert [id(v) for v in outer.weights] == [
        id(v) for v in [outer.scale, *new.weights]
    ], message


def test_own_variables():
    outer = _built_outer()
    message = _changed(
        "own_variables",
        "Layer._trainable_variables / _non_trainable_variables no longer "
        "hold only the layer's own variables",
    )
    assert [id(v) for v in internals.own_variables(outer)] == [
        id(outer.scale)
    ], message


def test_forget_own_variables():
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    internals.forget_own_variables(dense)
    assert dense.weights == [], _changed(
        "forget_own_variables",
        "Layer.weights no longer comes from Layer._trainable_variables / "
        "_non_trainable_variables",
    )


def test_forget_checkpoint_variables():
    dense = keras.layers.Dense(2)
    dense.build((None, 3))

    def variable_children():
        children = tf.train.TrackableView(dense).children(dense)
        return [
            k
            for k, v in children.items()
            if isinstance(v, (keras.Variable, tf.Variable))
        ]

    message = _changed(
        "forget_checkpoint_variables",
        "a TF layer's checkpoint dependencies no longer live in "
        "_self_unconditional_dependency_names / "
        "_self_unconditional_checkpoint_dependencies",
    )
    assert variable_children(), message
    internals.forget_checkpoint_variables(dense)
    assert variable_children() == [], message


def test_unlocked_state():
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    with pytest.raises(ValueError, match="cannot add new elements of state"):
        dense.add_weight(shape=(1,), name="before")
    with internals.unlocked_state(dense):
        extra = dense.add_weight(shape=(1,), name="extra")
    message = _changed(
        "unlocked_state",
        "Layer._tracker.locked / unlock() / lock() no longer guard adding "
        "variables to a built layer",
    )
    assert any(v is extra for v in dense.weights), message
    with pytest.raises(ValueError, match="cannot add new elements of state"):
        dense.add_weight(shape=(1,), name="after")


def test_flatten_layers():
    outer = _built_outer()
    message = _changed(
        "flatten_layers",
        "Layer._flatten_layers(include_self=...) no longer lists the layer "
        "and its sublayers",
    )
    assert internals.flatten_layers(outer) == [
        outer,
        outer.first,
        outer.second,
    ], message
    assert internals.flatten_layers(outer, include_self=False) == [
        outer.first,
        outer.second,
    ], message


# -- remat: call context ----------------------------------------------------


def test_remat_mode():
    with keras.RematScope(mode="full"):
        inside = keras.layers.Dense(2)
    message = _changed(
        "remat_mode",
        "keras.RematScope no longer marks the layers created in it with "
        "Layer._remat_mode (a RematMode with .mode)",
    )
    assert internals.remat_mode(inside) == "full", message
    assert internals.remat_mode(keras.layers.Dense(2)) is None, message


def test_layer_seed_generators():
    dropout = keras.layers.Dropout(0.5)
    outer = _Outer()
    outer.drop = keras.layers.Dropout(0.5)
    generators = internals.layer_seed_generators(dropout)
    message = _changed(
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
    ), _changed(
        "global_seed_generator",
        "unseeded random ops no longer draw from the global attribute "
        "'global_seed_generator'",
    )


def test_get_keras_mask():
    embedding = keras.layers.Embedding(5, 2, mask_zero=True)
    out = embedding(np.array([[1, 0]]))
    mask = internals.get_keras_mask(out)
    assert mask is not None and mask.numpy().tolist() == [[True, False]], (
        _changed(
            "get_keras_mask",
            "Keras no longer attaches masks to eager tensors where "
            "keras.src.backend.get_keras_mask reads them",
        )
    )


def test_set_keras_mask():
    x = tf.ones((1, 2))
    internals.set_keras_mask(x, tf.constant([[True, False]]))
    message = _changed(
        "set_keras_mask",
        "a mask set by keras.src.backend.set_keras_mask is no longer read "
        "back",
    )
    assert internals.get_keras_mask(x).numpy().tolist() == [
        [True, False]
    ], message


class _Recorder(keras.layers.Layer):
    """Records the call context and autocast dtype seen by its call."""

    def call(self, x, training=None):
        self.values = internals.call_context_values()
        self.dtype_seen = internals.autocast_dtype()
        return x


def test_autocast_dtype():
    recorder = _Recorder(dtype="mixed_bfloat16")
    recorder(np.ones((1, 2), "float32"))
    message = _changed(
        "autocast_dtype",
        "a mixed-precision layer's call no longer runs under the global "
        "'autocast_scope' (an AutocastScope with .dtype)",
    )
    assert recorder.dtype_seen == "bfloat16", message
    assert internals.autocast_dtype() is None, message


def test_call_context_values():
    recorder = _Recorder()
    recorder(np.ones((1, 2), "float32"), training=True)
    message = _changed(
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
    message = _changed(
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
    assert any(v is variable for v in registry), _changed(
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
    ), _changed(
        "set_uninitialized_variables",
        "global attribute 'uninitialized_variables' is not the registry",
    )


def test_is_deferred_variable(deferred_variable):
    variable, _ = deferred_variable
    message = _changed(
        "is_deferred_variable",
        "a deferred Variable no longer has _value None until initialized",
    )
    assert internals.is_deferred_variable(variable), message
    assert not internals.is_deferred_variable(keras.Variable(1.0)), message


def test_initialize_deferred_variable(deferred_variable):
    variable, _ = deferred_variable
    internals.initialize_deferred_variable(variable)
    message = _changed(
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
        err_msg=_changed(
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
        err_msg=_changed(
            "track_loss",
            "Trainer._loss_tracker is no longer the 'loss' metric of "
            "model.metrics",
        ),
    )


def test_turn_off_jit_compile():
    model, _ = _functional()
    internals.turn_off_jit_compile(model)
    message = _changed(
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
    assert Hooked.seen == [(True, None)], _changed(
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
    message = _changed(
        "OptimizerStepHooks",
        "TFOptimizer.apply no longer goes through _backend_update_step -> "
        "_distributed_tf_update_step(distribution, grads_and_vars, lr)",
    )
    assert Hooked.calls == ["scope", ("batched", 1)], message
    np.testing.assert_allclose(variable.numpy(), [0.5, 0.5], err_msg=message)
    Hooked.batched = True
    optimizer.apply([tf.ones((2,))], [variable])
    np.testing.assert_allclose(variable.numpy(), [-0.5, -0.5], err_msg=message)


# -- optimizers ---------------------------------------------------------------


def _built_sgd(*variables, **kwargs):
    optimizer = keras.optimizers.SGD(**kwargs)
    optimizer.build(list(variables))
    return optimizer


def test_variable_index():
    first = keras.Variable(np.zeros((2,), "float32"))
    second = keras.Variable(np.zeros((3,), "float32"))
    optimizer = _built_sgd(first, second)
    message = _changed(
        "variable_index",
        "Optimizer._get_variable_index no longer maps a variable (or its "
        "tf.Variable) to its build() position",
    )
    assert internals.variable_index(optimizer, second) == 1, message
    assert internals.variable_index(optimizer, second.value) == 1, message


def test_learning_rate_setting():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    message = _changed(
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
    optimizer = _built_sgd(normal, scale)
    message = _changed(
        "overwrites_with_gradient",
        "Optimizer._overwrite_variable_with_gradient no longer reads "
        "Variable.overwrite_with_gradient",
    )
    assert not internals.overwrites_with_gradient(optimizer, normal), message
    assert internals.overwrites_with_gradient(optimizer, scale), message


def test_optimizer_strategy():
    strategy = internals.optimizer_strategy(keras.optimizers.SGD())
    message = _changed(
        "optimizer_strategy",
        "TFOptimizer._distribution_strategy is no longer the strategy the "
        "optimizer was made under",
    )
    assert strategy is tf.distribute.get_strategy(), message
    assert callable(strategy.extended.colocate_vars_with), message


def test_optimizer_own_variables():
    variable = keras.Variable(np.zeros((2,), "float32"))
    optimizer = _built_sgd(variable, momentum=0.9)
    own = internals.optimizer_own_variables(optimizer)
    message = _changed(
        "optimizer_own_variables",
        "Optimizer._variables no longer holds every variable the optimizer "
        "made (Optimizer.variables)",
    )
    assert [id(v) for v in own] == [id(v) for v in optimizer.variables], (
        message
    )
    assert any(v is optimizer.iterations for v in own), message


# -- tf.distribute ------------------------------------------------------------


def test_num_workers():
    from tensorflow.python.distribute import collective_all_reduce_strategy

    source = inspect.getsource(
        collective_all_reduce_strategy.CollectiveAllReduceExtended
    )
    message = _changed(
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
    message = _changed(
        "local_resource_variable",
        "ResourceVariable(...) made directly no longer skips variable "
        "creators",
    )
    assert seen == [], message
    assert isinstance(variable, tf.Variable) and not variable.trainable
    assert variable.dtype == tf.uint8, message


# -- export -------------------------------------------------------------------


def test_input_signature():
    model, _ = _functional()
    signature = internals.input_signature(model)
    message = _changed(
        "input_signature",
        "keras.src.export.export_utils.get_input_signature no longer gives "
        "one InputSpec per model input",
    )
    assert len(signature) == 1, message
    assert tuple(signature[0].shape) == (None, 3), message


def test_export_archive_trackable():
    model, _ = _functional()
    archive = keras.export.ExportArchive()
    archive.track(model)
    trackable = internals.export_archive_trackable(archive)
    message = _changed(
        "export_archive_trackable",
        "ExportArchive._tf_trackable no longer holds the tracked variables "
        "in .variables / .trainable_variables / .non_trainable_variables",
    )
    assert trackable is not None, message
    assert len(trackable.variables) == len(model.variables), message
    assert isinstance(trackable.trainable_variables, list), message
    assert isinstance(trackable.non_trainable_variables, list), message


# -- EinsumDense ------------------------------------------------------------


def test_analyze_einsum_string():
    kernel, bias, full_output, *_ = internals.analyze_einsum_string(
        "abc,cde->abde", "de", (None, 5, 3), (5, 4, 2)
    )
    layer = keras.layers.EinsumDense(
        "abc,cde->abde", output_shape=(5, 4, 2), bias_axes="de"
    )
    layer.build((None, 5, 3))
    message = _changed(
        "analyze_einsum_string",
        "_analyze_einsum_string no longer returns (kernel_shape, "
        "bias_shape, full_output_shape, ...) as EinsumDense.build uses them",
    )
    assert tuple(kernel) == tuple(layer.kernel.shape), message
    assert tuple(bias) == tuple(layer.bias.shape), message
    assert tuple(full_output) == (None, 5, 4, 2), message


# -- keras_hub presets ------------------------------------------------------


def _bert(seed):
    import keras_hub

    keras.utils.set_random_seed(seed)
    return keras_hub.models.BertBackbone(
        vocabulary_size=20,
        num_layers=1,
        num_heads=1,
        hidden_dim=4,
        intermediate_dim=4,
        max_sequence_length=4,
    )


@pytest.fixture(scope="module")
def keras_preset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("preset")
    backbone = _bert(seed=0)
    backbone.save_to_preset(str(directory))
    return str(directory), backbone


def test_preset_loader(keras_preset, tmp_path):
    directory, _ = keras_preset
    loader = internals.preset_loader(directory)
    message = _changed(
        "preset_loader",
        "keras_hub's get_preset_loader no longer gives a loader with "
        ".config, or no longer raises ValueError for an unknown preset",
    )
    assert loader.config["class_name"].endswith("BertBackbone"), message
    with pytest.raises(ValueError):
        internals.preset_loader(str(tmp_path))


def test_load_backbone_weights(keras_preset):
    directory, saved = keras_preset
    backbone = _bert(seed=1)
    internals.load_backbone_weights(
        internals.preset_loader(directory), backbone
    )
    for got, want in zip(backbone.weights, saved.weights, strict=True):
        np.testing.assert_array_equal(
            got.numpy(),
            want.numpy(),
            err_msg=_changed(
                "load_backbone_weights",
                "KerasPresetLoader._load_backbone_weights(backbone) no "
                "longer fills the backbone from the preset",
            ),
        )


def test_safetensor_loader_class(tmp_path):
    from safetensors.numpy import save_file

    save_file({"encoder.w": np.arange(3, dtype="float32")}, tmp_path / "m.st")
    loader_class = internals.safetensor_loader_class()
    message = _changed(
        "safetensor_loader_class",
        "keras_hub's SafetensorLoader(preset, fname=...) no longer has "
        ".safetensor_config / .fname / get_prefixed_key / get_tensor / "
        "port_weight",
    )
    assert callable(getattr(loader_class, "port_weight", None)), message
    with loader_class(str(tmp_path), fname="m.st") as loader:
        assert loader.safetensor_config is None, message
        assert loader.fname == "m.st", message
        key = loader.get_prefixed_key("w", {"encoder.w": None})
        assert key == "encoder.w", message
        np.testing.assert_array_equal(loader.get_tensor("w"), [0, 1, 2])


# -- one door -----------------------------------------------------------------


def test_every_internal_has_a_test():
    names = [
        name
        for name, value in vars(internals).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == internals.__name__
        and name != "KerasInternalsChanged"
    ]
    tests = set(globals())
    snake = [re.sub(r"(?<!^)([A-Z])", r"_\1", n).lower() for n in names]
    missing = [n for n in snake if f"test_{n}" not in tests]
    assert not missing, f"internals without a test here: {missing}"


# Private Keras/TF/keras_hub attributes the package used before they moved
# into internals.py, and other private names of the objects it handles.
_PRIVATE_NAMES = frozenset(
    {
        "_backend_update_step",
        "_compute_loss",
        "_deferred_initialize",
        "_distributed_tf_update_step",
        "_distribution_strategy",
        "_flatten_layers",
        "_functional",
        "_get_variable_index",
        "_inbound_nodes",
        "_inputs",
        "_jit_compile",
        "_keras_history",
        "_keras_mask",
        "_keras_variable",
        "_layers",
        "_learning_rate",
        "_load_backbone_weights",
        "_loss_tracker",
        "_maybe_rebuild",
        "_maybe_symbolic_build",
        "_nodes",
        "_nodes_by_depth",
        "_non_trainable_variables",
        "_num_workers",
        "_operations",
        "_operations_by_depth",
        "_outbound_nodes",
        "_outputs",
        "_parent_path",
        "_overwrite_variable_with_gradient",
        "_remat_mode",
        "_seed_generators",
        "_self_unconditional_checkpoint_dependencies",
        "_self_unconditional_dependency_names",
        "_tf_trackable",
        "_tracker",
        "_trainable_variables",
        "_value",
        "_variables",
    }
)
_PRIVATE_MODULES = ("keras.src", "tensorflow.python", "keras_hub.src")


def _keras_private_names():
    """Private attributes of the Keras objects the package handles, beyond
    `_PRIVATE_NAMES`: a new use of any of them belongs in internals.py."""
    model, _ = _functional()
    optimizer = _built_sgd(keras.Variable(np.zeros((2,), "float32")))
    objects = (model, keras.Sequential([]), keras.layers.Dense(1), optimizer)
    names = set()
    for obj in objects:
        names.update(n for n in dir(obj) if n.startswith("_") and n[1] != "_")
    return names


def _private_uses(path, private):
    """`(line, text)` of each private Keras/TF name used in `path`: imports
    of private modules, `.name` attribute access, `"name"` strings (getattr),
    and methods named like a Keras private method (overrides)."""
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        modules = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Call) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                modules = [first.value]
        for module in modules:
            if module.startswith(_PRIVATE_MODULES):
                found.append((node.lineno, module))
        if isinstance(node, ast.ClassDef):
            for method in node.body:
                if (
                    isinstance(method, ast.FunctionDef)
                    and method.name in private
                ):
                    found.append((method.lineno, f"def {method.name}"))
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for before, token in zip(tokens, tokens[1:]):
        is_attr = before.string == "." and token.type == tokenize.NAME
        if is_attr and token.string in private:
            found.append((token.start[0], f".{token.string}"))
        if token.type == tokenize.STRING:
            try:
                value = ast.literal_eval(token.string)
            except (ValueError, SyntaxError):
                continue
            if value in private:
                found.append((token.start[0], repr(value)))
    return found


# The package's own private names that Keras objects happen to have too.
_OWN_NAMES = frozenset()


def test_no_private_keras_names_outside_internals():
    private = (_PRIVATE_NAMES | _keras_private_names()) - _OWN_NAMES
    uses = []
    for path in sorted(_PACKAGE.rglob("*.py")):
        if path.name == "internals.py" and path.parent == _PACKAGE:
            continue
        for line, what in _private_uses(path, private):
            uses.append(f"{path.relative_to(_PACKAGE.parent)}:{line}: {what}")
    assert not uses, (
        "Private Keras/TF/keras_hub names used outside "
        "keras_qlora/internals.py (add a function there instead):\n"
        + "\n".join(uses)
    )


def test_private_name_scan_finds_uses(tmp_path):
    path = tmp_path / "sample.py"
    path.write_text(
        "from keras.src.ops.node import KerasHistory\n"
        "x = layer._inbound_nodes\n"
        "y = getattr(strategy.extended, '_num_workers', 1)\n"
        "class M:\n"
        "    def _maybe_symbolic_build(self):\n"
        "        pass\n"
        "z = layer._own_thing  # '_inbound_nodes' in a comment is fine\n"
    )
    lines = [line for line, _ in _private_uses(path, _PRIVATE_NAMES)]
    assert lines == [1, 5, 2, 3]


def test_parent_path():
    layer = keras.layers.Dense(2, name="d")
    assert internals.parent_path(layer) is None, (
        "Keras/TF behaviour changed: Layer._parent_path is no longer None "
        "before the layer opens its name scope. Update "
        "keras_qlora.internals.parent_path"
    )
    with keras.name_scope("outer"):
        layer(np.ones((1, 3), "float32"))
    assert internals.parent_path(layer) == "outer", (
        "Keras/TF behaviour changed: Layer._parent_path no longer records "
        "the scope a layer was first called in. Update "
        "keras_qlora.internals.parent_path"
    )


def test_set_parent_path():
    layer = keras.layers.Dense(2, name="d")
    internals.set_parent_path(layer, "block_0/attention")
    layer.build((None, 3))
    assert layer.kernel.path == "block_0/attention/d/kernel", (
        "Keras/TF behaviour changed: a layer no longer creates its variables "
        "under Layer._parent_path. Update keras_qlora.internals."
        "set_parent_path"
    )


def _mha():
    layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.2)
    x = np.ones((1, 3, 5), "float32")
    layer(x, x)
    return layer, x


def test_compute_attention_method():
    layer, _ = _mha()
    method = internals.compute_attention_method(layer)
    q = np.ones((1, 3, 2, 4), "float32")
    out, scores = method(q, q, q)
    assert tuple(out.shape) == (1, 3, 2, 4) and tuple(scores.shape) == (
        1, 2, 3, 3,
    ), _changed(
        "compute_attention_method",
        "MultiHeadAttention._compute_attention(query, key, value) no longer "
        "returns (output, scores) for projected (B, T, N, H) inputs",
    )


def test_compute_attention_override():
    layer, _ = _mha()
    assert internals.compute_attention_override(layer) is None
    internals.set_compute_attention(layer, len)
    assert internals.compute_attention_override(layer) is len


def test_set_compute_attention():
    layer, x = _mha()
    seen = []
    own = internals.compute_attention_method(layer)

    def hook(*args, **kwargs):
        seen.append(True)
        return own(*args, **kwargs)

    internals.set_compute_attention(layer, hook)
    layer(x, x)
    assert seen, _changed(
        "set_compute_attention",
        "MultiHeadAttention.call no longer calls self._compute_attention",
    )
    internals.set_compute_attention(layer, None)
    layer(x, x)
    assert len(seen) == 1


def test_attention_scale():
    layer, _ = _mha()
    assert internals.attention_scale(layer) == pytest.approx(0.5), _changed(
        "attention_scale",
        "MultiHeadAttention._inverse_sqrt_key_dim is no longer 1/sqrt(key_dim)",
    )


def test_attention_dropout_rate():
    layer, _ = _mha()
    assert internals.attention_dropout_rate(layer) == pytest.approx(0.2), (
        _changed(
            "attention_dropout_rate",
            "MultiHeadAttention._dropout no longer holds the dropout rate",
        )
    )


def test_attention_axes():
    layer, _ = _mha()
    assert internals.attention_axes(layer) == (1,), _changed(
        "attention_axes",
        "MultiHeadAttention._attention_axes is no longer (1,) for 3-D inputs",
    )
