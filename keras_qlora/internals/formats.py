"""Private Keras / keras_hub names of export, EinsumDense equations,
keras_hub presets, variable paths and attention entry points. See the
package docstring."""

from keras_qlora.internals._base import attr
from keras_qlora.internals._base import changed
from keras_qlora.internals._base import private

# -- export (export.py) -------------------------------------------------------


def input_signature(model):
    """The input specs `model.export` would trace the model with (Keras 3.15
    `keras.src.export.export_utils.get_input_signature`)."""
    function = private(
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
    function = private(
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
    function = private(
        "keras_hub.src.utils.preset_utils",
        "get_preset_loader",
        "keras_hub's get_preset_loader()",
    )
    return function(preset)


def safetensor_loader_class():
    """keras_hub's reader of Transformers safetensors checkpoints, a
    context manager with `get_tensor`, `port_weight`, `get_prefixed_key`
    (keras_hub 0.32 `transformers.safetensor_utils.SafetensorLoader`)."""
    return private(
        "keras_hub.src.utils.transformers.safetensor_utils",
        "SafetensorLoader",
        "keras_hub's SafetensorLoader",
    )


def load_backbone_weights(loader, backbone):
    """Loads a Keras-format preset's weights into `backbone` (keras_hub 0.32
    `KerasPresetLoader._load_backbone_weights`)."""
    function = attr(
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
    return attr(layer, "_parent_path", "Keras' Layer._parent_path")


def set_parent_path(layer, path):
    """Makes `layer` open its name scope, so create its variables, under
    `path` (Keras 3.15 `name_scope(..., caller=layer)` starts from
    `Layer._parent_path` when it is set)."""
    attr(layer, "_parent_path", "Keras' Layer._parent_path")
    layer._parent_path = path


# -- attention entry points (chunked/attention_layers.py) ---------------------


def compute_attention_method(layer):
    """The class's own `_compute_attention` of `layer`, bound to it: the
    method that takes the projected `(query, key, value, attention_mask)`
    and returns the attention output, in Keras' `MultiHeadAttention` and
    keras_hub 0.32's Llama, Mistral, Qwen and Gemma attention layers."""
    method = attr(
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
    raise changed(
        f"the score scale of {type(layer).__name__} (_inverse_sqrt_key_dim "
        "or _inv_norm_factor)"
    )


def attention_dropout_rate(layer) -> float:
    """Keras `MultiHeadAttention`'s dropout on the attention probabilities
    (`_dropout`)."""
    return float(attr(layer, "_dropout", "MultiHeadAttention._dropout"))


def attention_axes(layer) -> tuple:
    """The axes Keras `MultiHeadAttention` attends over (`_attention_axes`;
    `(1,)` for the usual `(batch, seq, heads, dim)` layout)."""
    axes = attr(layer, "_attention_axes", "MultiHeadAttention._attention_axes")
    return tuple(axes)
