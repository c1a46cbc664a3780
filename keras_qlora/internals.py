"""Every private Keras, TensorFlow and keras_hub name keras_qlora uses.

keras_qlora edits built models in place (swapping layers in a Functional
graph, unlocking a layer's tracker), hooks into Keras' train step and
optimizer, and replays Keras' call context when it recomputes a block.
Keras has no public API for these, so they use Keras' internals; this
module is the only place that touches them. Each function below wraps one
internal and says which behaviour of which version it relies on (checked
against Keras 3.15, TensorFlow 2.21, keras_hub 0.32; the pinned range is in
setup.cfg), and `tests/test_internals.py` pins that behaviour, one test per
function. When Keras moves or renames an internal, the functions here raise
`KerasInternalsChanged` naming it instead of an AttributeError deep in a
model edit.

Upgrading Keras: run `pytest tests/test_internals.py`; each failure names the
behaviour that changed and the one function to update.
"""

import contextlib
import importlib

import keras
import tensorflow as tf

_SUPPORTED = (
    "The supported Keras range (and TensorFlow, keras_hub) is pinned in "
    "keras_qlora's setup.cfg."
)


class KerasInternalsChanged(RuntimeError):
    """A private Keras/TF/keras_hub name keras_qlora needs is gone."""


def _changed(what, err=None):
    detail = f" ({type(err).__name__}: {err})" if err is not None else ""
    return KerasInternalsChanged(
        f"keras_qlora needs {what}; this version (keras "
        f"{keras.__version__}, tensorflow {tf.__version__}) changed it"
        f"{detail}. {_SUPPORTED}"
    )


def _private(module, name, what):
    """`module.name`, imported on first use; a clear error if it moved."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise _changed(f"{what} ({module}.{name})", err) from None


def _attr(obj, name, what):
    """`obj.name`, or a clear error naming the Keras internal."""
    try:
        return getattr(obj, name)
    except AttributeError as err:
        raise _changed(what, err) from None


# -- Functional / Sequential graphs (surgery.py, adapters/merge.py) ----------

# Attributes of a layer that hold Keras bookkeeping (the tracker, graph
# nodes, a Sequential's internal Functional), not the model's structure.
_BOOKKEEPING_ATTRS = frozenset(
    "_tracker _layers _operations _inbound_nodes _outbound_nodes _functional "
    "_nodes_by_depth _operations_by_depth _nodes".split()
)


def is_bookkeeping_attr(name) -> bool:
    """Whether instance attribute `name` is Keras bookkeeping that a walk of
    a model's layers must not follow (Keras 3.15 `Layer`, `Functional`,
    `Sequential`: `_tracker`, `_layers`, `_inbound_nodes`, ...)."""
    return name in _BOOKKEEPING_ATTRS


def is_functional(model) -> bool:
    """Whether `model` is a Keras Functional model (`keras.Model(inputs,
    outputs)`, keras_hub backbones). Keras 3.15 exports no public class for
    it: `keras.src.models.functional.Functional`."""
    functional = _private(
        "keras.src.models.functional", "Functional", "Keras' Functional class"
    )
    return isinstance(model, functional)


def sequential_layers(model) -> list:
    """The list a `keras.Sequential` reads its layers from, itself (not a
    copy), InputLayer included (Keras 3.15 `Sequential._layers`)."""
    return _attr(model, "_layers", "Keras' Sequential._layers list")


def rebuild_sequential(model):
    """Rebuilds a Sequential's internal Functional graph from its layer list
    (Keras 3.15 `Sequential._maybe_rebuild`)."""
    _attr(model, "_maybe_rebuild", "Keras' Sequential._maybe_rebuild()")()


def inbound_nodes(layer) -> list:
    """The graph nodes where `layer` was called symbolically (Keras 3.15
    `Operation._inbound_nodes`; each node has `input_tensors`)."""
    return list(
        _attr(layer, "_inbound_nodes", "Keras' Operation._inbound_nodes") or []
    )


def move_graph_nodes(old, new):
    """Makes `new` the operation of every graph node of `old`.

    Relies on Keras 3.15 `Operation._inbound_nodes` / `_outbound_nodes`,
    `Node.operation` and the `_keras_history` (a `KerasHistory(operation,
    node_index, tensor_index)`) of each node's output tensors.
    """
    history_class = _private(
        "keras.src.ops.node", "KerasHistory", "Keras' KerasHistory"
    )
    what = "Keras' Operation._inbound_nodes / _outbound_nodes"
    new._inbound_nodes = list(_attr(old, "_inbound_nodes", what))
    new._outbound_nodes = list(_attr(old, "_outbound_nodes", what))
    for node in new._inbound_nodes:
        node.operation = new
        for tensor in node.outputs:
            history = _attr(
                tensor, "_keras_history", "Keras' KerasTensor._keras_history"
            )
            if history.operation is old:
                tensor._keras_history = history_class(
                    new, history.node_index, history.tensor_index
                )
    old._inbound_nodes = []
    old._outbound_nodes = []


def recompute_functional_graph(model):
    """Recomputes a Functional model's node and operation bookkeeping from
    its inputs and outputs, after its layers changed (Keras 3.15
    `keras.src.ops.function.map_graph` and `Function._inputs`, `_outputs`,
    `_nodes`, `_nodes_by_depth`, `_operations`, `_operations_by_depth`)."""
    map_graph = _private(
        "keras.src.ops.function", "map_graph", "Keras' map_graph()"
    )
    what = "Keras' Function._inputs / _outputs"
    nodes, by_depth, operations, ops_by_depth = map_graph(
        _attr(model, "_inputs", what), _attr(model, "_outputs", what)
    )
    model._nodes = nodes
    model._nodes_by_depth = by_depth
    model._operations = operations
    model._operations_by_depth = ops_by_depth


# -- layer state tracking (surgery.py, adapters/, layers/) --------------------


def _tracker(layer):
    return _attr(layer, "_tracker", "Keras' Layer._tracker")


def replace_tracked_layer(parent, old, new):
    """Puts `new` in place of `old` in `parent`'s tracked sublayers, keeping
    their order, without lifting the lock of a built layer (Keras 3.15
    `Layer._tracker`: `is_in_store`, `untrack`, `replace_tracked_value`, as
    Keras' own `quantize()` uses them). No-op for untracked parents."""
    tracker = getattr(parent, "_tracker", None)
    if tracker is None:
        return
    if tracker.is_in_store("layers", old):
        if tracker.is_in_store("layers", new):
            tracker.untrack(old)
        else:
            tracker.replace_tracked_value("layers", old, new)


def own_variables(layer) -> list:
    """The variables `layer` created itself, not its sublayers' (Keras 3.15
    `Layer._trainable_variables` + `Layer._non_trainable_variables`)."""
    what = "Keras' Layer._trainable_variables / _non_trainable_variables"
    return list(_attr(layer, "_trainable_variables", what)) + list(
        _attr(layer, "_non_trainable_variables", what)
    )


def forget_own_variables(layer):
    """Empties Keras' lists of the variables `layer` owns (Keras 3.15
    `Layer._trainable_variables`, `_non_trainable_variables`), and the
    tracker's `stored_ids["variables"]` where a Keras version has that
    store (3.15 has none)."""
    for store in ("_trainable_variables", "_non_trainable_variables"):
        variables = getattr(layer, store, None)
        if isinstance(variables, list):
            del variables[:]
    tracker = getattr(layer, "_tracker", None)
    if tracker is not None and "variables" in tracker.stored_ids:
        tracker.stored_ids["variables"].clear()


def forget_checkpoint_variables(layer):
    """Drops the references to variables that `layer`, as a TensorFlow
    checkpoint object, holds (TF 2.21 `AutoTrackable`
    `_self_unconditional_dependency_names` /
    `_self_unconditional_checkpoint_dependencies`; a Keras variable's
    `tf.Variable` carries `_keras_variable`)."""

    def is_variable(value):
        return isinstance(value, keras.Variable) or hasattr(
            value, "_keras_variable"
        )

    names = vars(layer).get("_self_unconditional_dependency_names")
    if isinstance(names, dict):
        for key in [k for k, v in names.items() if is_variable(v)]:
            dict.__delitem__(names, key)
    refs = vars(layer).get("_self_unconditional_checkpoint_dependencies")
    if isinstance(refs, list):
        refs[:] = [r for r in refs if not is_variable(getattr(r, "ref", None))]


@contextlib.contextmanager
def unlocked_state(layer):
    """Lets a built (locked) layer create variables, as Keras' own
    `enable_lora()` does (Keras 3.15 `Layer._tracker.locked`, `unlock()`,
    `lock()`); restores the lock on exit."""
    tracker = _tracker(layer)
    was_locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if was_locked:
            tracker.lock()


def flatten_layers(layer, include_self=True) -> list:
    """`layer` (if `include_self`) and all its sublayers, recursively
    (Keras 3.15 `Layer._flatten_layers`)."""
    return list(
        _attr(layer, "_flatten_layers", "Keras' Layer._flatten_layers()")(
            include_self=include_self
        )
    )


# -- rematerialization: Keras' call context (training/remat.py) -------------


def remat_mode(layer):
    """The mode (`"full"`, ...) of `keras.RematScope` the layer was created
    under, or None (Keras 3.15 `Layer._remat_mode`, a `RematMode`)."""
    mode = getattr(layer, "_remat_mode", None)
    return None if mode is None else mode.mode


def layer_seed_generators(layer) -> list:
    """The `keras.random.SeedGenerator`s `layer` itself owns (Keras 3.15
    `Layer._seed_generators`; not its sublayers')."""
    return list(getattr(layer, "_seed_generators", []))


def _global_state():
    return importlib.import_module("keras.src.backend.common.global_state")


def _global(name):
    try:
        return _global_state().get_global_attribute(name)
    except (ImportError, AttributeError) as err:
        raise _changed(
            "Keras' global_state.get_global_attribute()", err
        ) from None


def _set_global(name, value):
    try:
        _global_state().set_global_attribute(name, value)
    except (ImportError, AttributeError) as err:
        raise _changed(
            "Keras' global_state.set_global_attribute()", err
        ) from None


def global_seed_generator():
    """The generator unseeded random ops draw from, None if none was made
    yet (Keras 3.15 global attribute `"global_seed_generator"`)."""
    return _global("global_seed_generator")


def get_keras_mask(x):
    """The Keras mask attached to tensor `x` (Keras 3.15
    `keras.src.backend.get_keras_mask`)."""
    return _private(
        "keras.src.backend", "get_keras_mask", "Keras' get_keras_mask()"
    )(x)


def set_keras_mask(x, mask):
    """Attaches Keras mask `mask` to tensor `x` (Keras 3.15
    `keras.src.backend.set_keras_mask`)."""
    _private(
        "keras.src.backend", "set_keras_mask", "Keras' set_keras_mask()"
    )(x, mask)


def autocast_dtype():
    """The dtype of the active mixed-precision autocast scope, or None
    (Keras 3.15 global attribute `"autocast_scope"`, an `AutocastScope`)."""
    scope = _global("autocast_scope")
    return None if scope is None else scope.dtype


def call_context_values() -> dict:
    """The values (`training`, ...) of the active layer call context,
    without its entry layer (Keras 3.15 global attribute
    `"current_call_ctx"`, a `CallContext` holding values as attributes)."""
    context = _global("current_call_ctx")
    return {
        key: value
        for key, value in (vars(context) if context else {}).items()
        if key != "entry_layer"
    }


@contextlib.contextmanager
def call_context(layer, values, dtype):
    """Runs the body under a call context entered at `layer` holding
    `values`, and under an autocast scope of `dtype` (None: no autocast),
    as `call_context_values()` / `autocast_dtype()` captured them (Keras
    3.15 `CallContext`, `AutocastScope`, `"current_call_ctx"`)."""
    context_class = _private(
        "keras.src.layers.layer", "CallContext", "Keras' CallContext"
    )
    autocast_scope = _private(
        "keras.src.backend.common.variables",
        "AutocastScope",
        "Keras' AutocastScope",
    )
    previous = _global("current_call_ctx")
    context = context_class(entry_layer=layer)
    for key, value in values.items():
        context.set_value(key, value)
    _set_global("current_call_ctx", context)
    try:
        with autocast_scope(dtype):
            yield
    finally:
        _set_global("current_call_ctx", previous)


# -- deferred variables (deferred.py) ----------------------------------------


def uninitialized_variables() -> list:
    """Keras' registry of variables created in a StatelessScope and not yet
    initialized (Keras 3.15 global attribute `"uninitialized_variables"`)."""
    return _global("uninitialized_variables") or []


def set_uninitialized_variables(variables):
    """Replaces Keras' registry of uninitialized variables (see
    `uninitialized_variables`)."""
    _set_global("uninitialized_variables", variables)


def is_deferred_variable(variable) -> bool:
    """Whether a variable was created deferred and holds no value yet
    (Keras 3.15 `Variable._value` is None until `_deferred_initialize`)."""
    return getattr(variable, "_value", True) is None


def initialize_deferred_variable(variable):
    """Allocates and initializes a deferred variable (Keras 3.15
    `Variable._deferred_initialize`)."""
    _attr(
        variable,
        "_deferred_initialize",
        "Keras' Variable._deferred_initialize()",
    )()


# -- the train step (training/step.py, model.py) ------------------------------


def compute_loss(model, x, y, y_pred, sample_weight, training):
    """The model's loss as `Model.train_step` computes it (Keras 3.15
    `Trainer._compute_loss`: compiled loss plus `model.losses`)."""
    function = _attr(model, "_compute_loss", "Keras' Trainer._compute_loss()")
    return function(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )


def track_loss(model, loss, batch_size):
    """Adds a step's loss to the model's `loss` metric as `train_step` does:
    unscaled for tf.distribute, weighted by batch size (Keras 3.15
    `Trainer._loss_tracker`, `keras.src.losses.loss.
    unscale_loss_for_distribution`)."""
    unscale = _private(
        "keras.src.losses.loss",
        "unscale_loss_for_distribution",
        "Keras' unscale_loss_for_distribution()",
    )
    tracker = _attr(model, "_loss_tracker", "Keras' Trainer._loss_tracker")
    tracker.update_state(unscale(loss), sample_weight=batch_size)


def turn_off_jit_compile(model):
    """Sets an explicit `jit_compile=True` to False, leaving an unresolved
    "auto" alone (Keras 3.15 `Trainer._jit_compile`; the public property
    would resolve "auto" on read)."""
    if getattr(model, "_jit_compile", None):
        model._jit_compile = False


class SymbolicBuildHook:
    """Mixin for `keras.Model` subclasses: `before_symbolic_build` sees (and
    may replace) what `fit` builds the model from, before Keras' first
    step (Keras 3.15 `Trainer._maybe_symbolic_build(iterator, data_batch)`).
    List it before `keras.Model` in the bases."""

    def before_symbolic_build(self, iterator, data_batch):
        """Returns the `(iterator, data_batch)` to build from."""
        return iterator, data_batch

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        iterator, data_batch = self.before_symbolic_build(iterator, data_batch)
        return super()._maybe_symbolic_build(
            iterator=iterator, data_batch=data_batch
        )


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
    function = _attr(
        optimizer,
        "_get_variable_index",
        "Keras' Optimizer._get_variable_index()",
    )
    return function(variable)


def learning_rate_setting(optimizer):
    """The learning rate as given: a float variable, or the schedule or
    callable itself (Keras 3.15 `Optimizer._learning_rate`)."""
    return _attr(optimizer, "_learning_rate", "Keras' Optimizer._learning_rate")


def overwrites_with_gradient(optimizer, variable) -> bool:
    """Whether the optimizer assigns the gradient to `variable` instead of
    updating it (float8 scale variables; Keras 3.15
    `Optimizer._overwrite_variable_with_gradient`)."""
    function = _attr(
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
    return _attr(optimizer, "_variables", "Keras' Optimizer._variables")


# -- tf.distribute (training/multi_worker.py, layers/frozen_state.py) ---------


def num_workers(strategy) -> int:
    """The number of workers a strategy spans; 1 for strategies that do not
    say (TF 2.21 `CollectiveAllReduceExtended._num_workers`)."""
    return getattr(strategy.extended, "_num_workers", 1)


def local_resource_variable(initial_value, name, dtype, shape):
    """A frozen `tf.Variable` made directly, skipping every variable creator
    (a strategy's broadcast included; TF 2.21
    `tensorflow.python.ops.resource_variable_ops.ResourceVariable`)."""
    variable_class = _private(
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


# -- export (export.py) -------------------------------------------------------


def input_signature(model):
    """The input specs `model.export` would trace the model with (Keras 3.15
    `keras.src.export.export_utils.get_input_signature`)."""
    function = _private(
        "keras.src.export.export_utils",
        "get_input_signature",
        "Keras' get_input_signature()",
    )
    return function(model)


def export_archive_trackable(archive):
    """The TF object an `ExportArchive` writes, with `variables`,
    `trainable_variables` and `non_trainable_variables` lists (Keras 3.15
    `ExportArchive._tf_trackable`); None if it has none."""
    return getattr(archive, "_tf_trackable", None)


# -- EinsumDense (adapters/merge.py) ------------------------------------------


def analyze_einsum_string(equation, bias_axes, input_shape, output_shape):
    """`(kernel_shape, bias_shape, full_output_shape, ...)` as
    `keras.layers.EinsumDense.build` derives them (Keras 3.15
    `keras.src.layers.core.einsum_dense._analyze_einsum_string`)."""
    function = _private(
        "keras.src.layers.core.einsum_dense",
        "_analyze_einsum_string",
        "Keras' EinsumDense equation analysis",
    )
    return function(equation, bias_axes, input_shape, output_shape)


# -- keras_hub presets (loading/preset.py) -------------------------------------


def preset_loader(preset):
    """keras_hub's loader for a preset directory, which knows its format and
    converter (keras_hub 0.32 `preset_utils.get_preset_loader`; raises
    ValueError for an unknown format)."""
    function = _private(
        "keras_hub.src.utils.preset_utils",
        "get_preset_loader",
        "keras_hub's get_preset_loader()",
    )
    return function(preset)


def safetensor_loader_class():
    """keras_hub's reader of Transformers safetensors checkpoints, a
    context manager with `get_tensor`, `port_weight`, `get_prefixed_key`
    (keras_hub 0.32 `transformers.safetensor_utils.SafetensorLoader`)."""
    return _private(
        "keras_hub.src.utils.transformers.safetensor_utils",
        "SafetensorLoader",
        "keras_hub's SafetensorLoader",
    )


def load_backbone_weights(loader, backbone):
    """Loads a Keras-format preset's weights into `backbone` (keras_hub 0.32
    `KerasPresetLoader._load_backbone_weights`)."""
    function = _attr(
        loader,
        "_load_backbone_weights",
        "keras_hub's KerasPresetLoader._load_backbone_weights()",
    )
    function(backbone)


# -- variable paths (layers/paths.py) -----------------------------------------


def parent_path(layer):
    """The name-scope path Keras recorded above `layer`, or None: Keras
    3.15 sets `Layer._parent_path` (None in `Layer.__init__`) the first
    time the layer opens its name scope."""
    return _attr(layer, "_parent_path", "Keras' Layer._parent_path")


def set_parent_path(layer, path):
    """Makes `layer` open its name scope, so create its variables, under
    `path` (Keras 3.15 `name_scope(..., caller=layer)` starts from
    `Layer._parent_path` when it is set)."""
    _attr(layer, "_parent_path", "Keras' Layer._parent_path")
    layer._parent_path = path


# -- attention entry points (chunked/attention_layers.py) ---------------------


def compute_attention_method(layer):
    """The class's own `_compute_attention` of `layer`, bound to it: the
    method that takes the projected `(query, key, value, attention_mask)`
    and returns the attention output, in Keras' `MultiHeadAttention` and
    keras_hub 0.32's Llama, Mistral, Qwen and Gemma attention layers."""
    method = _attr(
        type(layer), "_compute_attention", "the layer's _compute_attention()"
    )
    return method.__get__(layer, type(layer))


def compute_attention_override(layer):
    """The function `set_compute_attention` put on `layer`, or None."""
    return vars(layer).get("_compute_attention")


def set_compute_attention(layer, function):
    """Makes `layer.call` use `function` as its `_compute_attention` (an
    instance attribute shadows the method: the layers call it as
    `self._compute_attention(...)`); None puts the class's method back."""
    compute_attention_method(layer)
    if function is None:
        vars(layer).pop("_compute_attention", None)
    else:
        object.__setattr__(layer, "_compute_attention", function)


def attention_scale(layer) -> float:
    """The factor the scores are multiplied by: Keras'
    `MultiHeadAttention._inverse_sqrt_key_dim`, keras_hub's Llama / Mistral /
    Qwen `_inv_norm_factor`."""
    for name in ("_inverse_sqrt_key_dim", "_inv_norm_factor"):
        if name in vars(layer):
            return float(vars(layer)[name])
    raise _changed(
        f"the score scale of {type(layer).__name__} (_inverse_sqrt_key_dim "
        "or _inv_norm_factor)"
    )


def attention_dropout_rate(layer) -> float:
    """Keras `MultiHeadAttention`'s dropout on the attention probabilities
    (`_dropout`)."""
    return float(_attr(layer, "_dropout", "MultiHeadAttention._dropout"))


def attention_axes(layer) -> tuple:
    """The axes Keras `MultiHeadAttention` attends over (`_attention_axes`;
    `(1,)` for the usual `(batch, seq, heads, dim)` layout)."""
    axes = _attr(layer, "_attention_axes", "MultiHeadAttention._attention_axes")
    return tuple(axes)
