"""Private Keras names of the call context (rematerialization), deferred
variables and the train step. See the package docstring."""

import contextlib
import importlib

from keras_qlora.internals._base import attr
from keras_qlora.internals._base import changed
from keras_qlora.internals._base import private

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
        raise changed(
            "Keras' global_state.get_global_attribute()", err
        ) from None


def _set_global(name, value):
    try:
        _global_state().set_global_attribute(name, value)
    except (ImportError, AttributeError) as err:
        raise changed(
            "Keras' global_state.set_global_attribute()", err
        ) from None


def global_seed_generator():
    """The generator unseeded random ops draw from, None if none was made
    yet (Keras 3.15 global attribute `"global_seed_generator"`)."""
    return _global("global_seed_generator")


def get_keras_mask(x):
    """The Keras mask attached to tensor `x` (Keras 3.15
    `keras.src.backend.get_keras_mask`)."""
    return private(
        "keras.src.backend", "get_keras_mask", "Keras' get_keras_mask()"
    )(x)


def set_keras_mask(x, mask):
    """Attaches Keras mask `mask` to tensor `x` (Keras 3.15
    `keras.src.backend.set_keras_mask`)."""
    private("keras.src.backend", "set_keras_mask", "Keras' set_keras_mask()")(
        x, mask
    )


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
    context_class = private(
        "keras.src.layers.layer", "CallContext", "Keras' CallContext"
    )
    autocast_scope = private(
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
    attr(
        variable,
        "_deferred_initialize",
        "Keras' Variable._deferred_initialize()",
    )()


# -- the train step (training/step.py, model.py) ------------------------------


def compute_loss(model, x, y, y_pred, sample_weight, training):
    """The model's loss as `Model.train_step` computes it (Keras 3.15
    `Trainer._compute_loss`: compiled loss plus `model.losses`)."""
    function = attr(model, "_compute_loss", "Keras' Trainer._compute_loss()")
    return function(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )


def track_loss(model, loss, batch_size):
    """Adds a step's loss to the model's `loss` metric as `train_step` does:
    unscaled for tf.distribute, weighted by batch size (Keras 3.15
    `Trainer._loss_tracker`, `keras.src.losses.loss.
    unscale_loss_for_distribution`)."""
    unscale = private(
        "keras.src.losses.loss",
        "unscale_loss_for_distribution",
        "Keras' unscale_loss_for_distribution()",
    )
    tracker = attr(model, "_loss_tracker", "Keras' Trainer._loss_tracker")
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
