"""Every private Keras, TensorFlow and keras_hub name keras_qlora uses.

keras_qlora edits built models in place (swapping layers in a Functional
graph, unlocking a layer's tracker), hooks into Keras' train step and
optimizer, and replays Keras' call context when it recomputes a block.
Keras has no public API for these, so they use Keras' internals; this
package is the only place that touches them. Each function below wraps one
internal and says which behaviour of which version it relies on (checked
against Keras 3.15, TensorFlow 2.21, keras_hub 0.32; the pinned range is in
setup.cfg), and `tests/keras_internals/` pins that behaviour, one test per
function. When Keras moves or renames an internal, the functions here raise
`KerasInternalsChanged` naming it instead of an AttributeError deep in a
model edit.

Upgrading Keras: run `pytest tests/keras_internals`; each failure names the
behaviour that changed and the one function to update.
"""

# Submodules by area: graphs (model surgery, layer tracking), calls (call
# context, deferred variables, train step), optimizers (optimizer steps,
# tf.distribute), formats (export, einsum, presets, paths, attention).
from keras_qlora.internals._base import KerasInternalsChanged
from keras_qlora.internals.calls import SymbolicBuildHook
from keras_qlora.internals.calls import autocast_dtype
from keras_qlora.internals.calls import call_context
from keras_qlora.internals.calls import call_context_values
from keras_qlora.internals.calls import compute_loss
from keras_qlora.internals.calls import get_keras_mask
from keras_qlora.internals.calls import global_seed_generator
from keras_qlora.internals.calls import initialize_deferred_variable
from keras_qlora.internals.calls import is_deferred_variable
from keras_qlora.internals.calls import layer_seed_generators
from keras_qlora.internals.calls import remat_mode
from keras_qlora.internals.calls import set_keras_mask
from keras_qlora.internals.calls import set_uninitialized_variables
from keras_qlora.internals.calls import track_loss
from keras_qlora.internals.calls import turn_off_jit_compile
from keras_qlora.internals.calls import uninitialized_variables
from keras_qlora.internals.formats import analyze_einsum_string
from keras_qlora.internals.formats import attention_axes
from keras_qlora.internals.formats import attention_dropout_rate
from keras_qlora.internals.formats import attention_scale
from keras_qlora.internals.formats import compute_attention_method
from keras_qlora.internals.formats import compute_attention_override
from keras_qlora.internals.formats import export_archive_trackable
from keras_qlora.internals.formats import input_signature
from keras_qlora.internals.formats import load_backbone_weights
from keras_qlora.internals.formats import parent_path
from keras_qlora.internals.formats import preset_loader
from keras_qlora.internals.formats import safetensor_loader_class
from keras_qlora.internals.formats import set_compute_attention
from keras_qlora.internals.formats import set_parent_path
from keras_qlora.internals.graphs import flatten_layers
from keras_qlora.internals.graphs import forget_checkpoint_variables
from keras_qlora.internals.graphs import forget_own_variables
from keras_qlora.internals.graphs import inbound_nodes
from keras_qlora.internals.graphs import is_bookkeeping_attr
from keras_qlora.internals.graphs import is_functional
from keras_qlora.internals.graphs import move_graph_nodes
from keras_qlora.internals.graphs import own_variables
from keras_qlora.internals.graphs import rebuild_sequential
from keras_qlora.internals.graphs import recompute_functional_graph
from keras_qlora.internals.graphs import replace_tracked_layer
from keras_qlora.internals.graphs import sequential_layers
from keras_qlora.internals.graphs import unlocked_state
from keras_qlora.internals.optimizers import OptimizerStepHooks
from keras_qlora.internals.optimizers import learning_rate_setting
from keras_qlora.internals.optimizers import local_resource_variable
from keras_qlora.internals.optimizers import num_workers
from keras_qlora.internals.optimizers import optimizer_own_variables
from keras_qlora.internals.optimizers import optimizer_strategy
from keras_qlora.internals.optimizers import overwrites_with_gradient
from keras_qlora.internals.optimizers import variable_index

__all__ = [
    "KerasInternalsChanged",
    "OptimizerStepHooks",
    "SymbolicBuildHook",
    "analyze_einsum_string",
    "attention_axes",
    "attention_dropout_rate",
    "attention_scale",
    "autocast_dtype",
    "call_context",
    "call_context_values",
    "compute_attention_method",
    "compute_attention_override",
    "compute_loss",
    "export_archive_trackable",
    "flatten_layers",
    "forget_checkpoint_variables",
    "forget_own_variables",
    "get_keras_mask",
    "global_seed_generator",
    "inbound_nodes",
    "initialize_deferred_variable",
    "input_signature",
    "is_bookkeeping_attr",
    "is_deferred_variable",
    "is_functional",
    "layer_seed_generators",
    "learning_rate_setting",
    "load_backbone_weights",
    "local_resource_variable",
    "move_graph_nodes",
    "num_workers",
    "optimizer_own_variables",
    "optimizer_strategy",
    "overwrites_with_gradient",
    "own_variables",
    "parent_path",
    "preset_loader",
    "rebuild_sequential",
    "recompute_functional_graph",
    "remat_mode",
    "replace_tracked_layer",
    "safetensor_loader_class",
    "sequential_layers",
    "set_compute_attention",
    "set_keras_mask",
    "set_parent_path",
    "set_uninitialized_variables",
    "track_loss",
    "turn_off_jit_compile",
    "uninitialized_variables",
    "unlocked_state",
    "variable_index",
]
