"""Gradient checkpointing: recompute transformer blocks in the backward pass.

A checkpointed block keeps only its inputs from the forward pass; its inner
activations (attention scores, the feed-forward hidden layer) are computed
again when the gradient needs them. With QLoRA, activations dominate training
memory once the base weights are 4-bit, so this trades ~1/3 more compute for
a much smaller peak.

How it is switched on for layers that are already built: the block's `call`
is replaced, on that instance only, by a wrapper around `tf.recompute_grad`.
Keras' own hook (a layer's remat mode, set by `keras.RematScope` when a layer
is created) routes the call through `keras.remat` = `tf.recompute_grad` as
well, but we do not use it, because on TensorFlow it:
- fails inside `tf.function` (so in `model.fit`) for any layer called with
  keyword arguments ("The custom_gradient decorator currently supports
  keywords arguments only when eager execution is enabled"), and every
  keras_hub block is (`training=`, `padding_mask=`, ...);
- recomputes outside the forward pass's Keras context: the `training` flag
  that sublayers inherit (e.g. Gemma's dropout, the LoRA dropout), the
  autocast scope of mixed precision, and the dropout seeds (`SeedGenerator`
  state advances in the forward pass, so a plain recomputation draws new
  masks and the gradient no longer matches the forward pass).

The wrapper passes float tensors positionally (everything else is closed
over), re-attaches their Keras masks, and recomputes under the forward pass's
call context and autocast scope, inside a `keras.StatelessScope` that maps
every seed generator of the block to its state before the forward pass:
the recomputation draws the same dropout masks, and its state updates
(seed increments, added losses) are discarded instead of applied twice.
"""

import contextlib
import functools
import re

import keras
import tensorflow as tf

from keras_qlora import internals
from keras_qlora import selectors
from keras_qlora import surgery
from keras_qlora.wrapper import unwrap

# Class names of transformer blocks in keras_hub 0.32 (GemmaDecoderBlock,
# LlamaTransformerDecoder, DFineDecoderLayer, ...).
_BLOCK_CLASS = re.compile(
    r".*(DecoderBlock|EncoderBlock|DecoderLayer|EncoderLayer|"
    r"TransformerLayer|TransformerBlock|TransformerDecoder|"
    r"TransformerEncoder)"
)
# keras_hub backbones keep their blocks in these lists (BertBackbone,
# GPT2Backbone, GemmaBackbone: transformer_layers; BartBackbone:
# encoder_transformer_layers, decoder_transformer_layers).
_BLOCK_LIST = re.compile(r"(.+_)?transformer_layers")

RECOGNIZED_BLOCKS = (
    "keras_hub.layers.TransformerEncoder / TransformerDecoder (and "
    "subclasses); layers whose class name ends in DecoderBlock, "
    "EncoderBlock, DecoderLayer, EncoderLayer, TransformerLayer, "
    "TransformerBlock, TransformerDecoder or TransformerEncoder; layers "
    "held in a backbone's `transformer_layers` (or `*_transformer_layers`) "
    "list"
)

# Marks our wrapper, so that it is never wrapped twice and can be removed.
_MARK = "_keras_qlora_checkpointed"


def enable_gradient_checkpointing(model, blocks=True) -> list[str]:
    """Makes the model recompute its transformer blocks in the backward pass.

    Gradients are unchanged (dropout included: the recomputation replays
    the forward pass's dropout masks); of a checkpointed block, only its
    inputs are kept for the backward pass. Works in eager
    mode and in `model.fit` (`tf.function`), with the fused NF4 op and the
    pure TensorFlow path. Only the outermost matching layer of a nest is
    checkpointed. Calling it again replaces the previous selection.

    Args:
        model: a `QLoRAModel` (its `base_model` is searched) or any Keras
            model or layer.
        blocks: `True` to detect transformer blocks (see
            `RECOGNIZED_BLOCKS`), or a selector as for
            `keras_qlora.apply`'s `target_modules`: a list of layer names
            or path suffixes, a regex string or `re.Pattern` (full match on
            the path or name), or a callable `(path, layer) -> bool`.

    Returns:
        The paths (as `keras_qlora.summary()` shows them) of the layers now
        recomputed, in model order.

    Raises:
        TypeError: `model` is not a Keras layer; `blocks` has another type.
        ValueError: no block recognized or matched (the message says which
            layer types are recognized and how to pass `blocks=`);
            `blocks=False`; a selected layer already uses Keras'
            `RematScope`.

    Example:
    >>> import keras_hub
    >>> backbone = keras_hub.models.BertBackbone(
    ...     vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, max_sequence_length=8)
    >>> enable_gradient_checkpointing(backbone)
    ['transformer_layer_0', 'transformer_layer_1']
    """
    root = _root(model)
    entries = surgery.walk(root)
    chosen = _select(entries, blocks)
    _refuse_keras_remat(chosen)
    disable_gradient_checkpointing(root)
    for entry in chosen:
        layer = entry.layer
        # An instance attribute shadows the class's `call`; Keras looks
        # `self.call` up at every call, so built layers pick it up.
        object.__setattr__(layer, "call", _checkpointed(layer, layer.call))
    return [entry.path for entry in chosen]


def find_blocks(model, blocks=True, arg="blocks") -> list[str]:
    """The paths `enable_gradient_checkpointing(model, blocks)` would
    checkpoint, without changing the model (same errors, naming `blocks`
    as `arg`).

    `keras_qlora.apply` calls it before editing a model, so that a model
    without recognizable blocks is refused before it is quantized.
    """
    entries = surgery.walk(_root(model))
    return [e.path for e in _select(entries, blocks, arg)]


def disable_gradient_checkpointing(model) -> list[str]:
    """Undoes `enable_gradient_checkpointing`.

    Args:
        model: a `QLoRAModel` or a Keras model or layer.

    Returns:
        The paths of the layers that were checkpointed (empty when none).

    Raises:
        TypeError: `model` is not a Keras layer.

    Example:
    >>> disable_gradient_checkpointing(keras.layers.Dense(2))
    []
    """
    root = _root(model)
    paths = []
    for entry in surgery.walk(root):
        if getattr(vars(entry.layer).get("call"), _MARK, False):
            object.__delattr__(entry.layer, "call")
            paths.append(entry.path)
    return paths


def checkpointed_layers(model) -> list[str]:
    """Paths of the layers that `enable_gradient_checkpointing` wrapped.

    Args:
        model: a `QLoRAModel` or a Keras model or layer.

    Returns:
        Paths in model order.

    Example:
    >>> checkpointed_layers(keras.layers.Dense(2))
    []
    """
    return [
        entry.path
        for entry in surgery.walk(_root(model))
        if getattr(vars(entry.layer).get("call"), _MARK, False)
    ]


# -- selection ------------------------------------------------------------


def _root(model):
    model = unwrap(model)
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "Gradient checkpointing expects a Keras model or layer (or a "
            f"QLoRAModel). Received: model of type {type(model).__name__}"
        )
    return model


def _select(entries, blocks, arg="blocks"):
    if blocks is True:
        matched = [e for e in entries if _is_block(e)]
        if not matched:
            raise ValueError(
                "No transformer blocks recognized for gradient "
                f"checkpointing. Recognized: {RECOGNIZED_BLOCKS}. Pass the "
                f"layers to recompute explicitly, e.g. {arg}=['layer_0', "
                f"'layer_1'], {arg}=r'layer_\\d+' or {arg}=lambda path, "
                "layer: ... . The model's layers are: "
                f"{_list_paths(entries)}"
            )
        return _outermost(matched)
    if blocks is False:
        raise ValueError(
            "blocks=False selects nothing; call "
            "disable_gradient_checkpointing(model) to turn it off. "
            "Received: blocks=False"
        )
    if not isinstance(
        blocks, (str, re.Pattern, list, tuple, set, frozenset)
    ) and not callable(blocks):
        raise TypeError(
            f"{arg} must be True, a list of layer names / path suffixes, a "
            "regex string, a re.Pattern or a callable (path, layer) -> "
            f"bool. Received: {arg}={blocks!r}"
        )
    match = selectors.matcher(blocks, arg)
    matched = [e for e in entries if match(e.path, e.layer)]
    if not matched:
        raise ValueError(
            f"{arg}={blocks!r} matched no layer. The model's layers are: "
            f"{_list_paths(entries)}"
        )
    return _outermost(matched)


def _is_block(entry):
    layer = entry.layer
    if _is_keras_hub_block(layer):
        return True
    if _BLOCK_CLASS.fullmatch(type(layer).__name__):
        return True
    return any(
        slot.kind == "item" and _BLOCK_LIST.fullmatch(slot.key)
        for slot in entry.slots
    )


def _is_keras_hub_block(layer):
    # Imported on use: plain Keras models do not need keras_hub loaded.
    import keras_hub

    return isinstance(
        layer,
        (
            keras_hub.layers.TransformerEncoder,
            keras_hub.layers.TransformerDecoder,
        ),
    )


def _outermost(entries):
    """Drops entries whose layer lies inside another entry's layer."""
    inner = set()
    for entry in entries:
        for sub in internals.flatten_layers(entry.layer, include_self=False):
            inner.add(id(sub))
    return [e for e in entries if id(e.layer) not in inner]


def _refuse_keras_remat(entries):
    for entry in entries:
        for sub in internals.flatten_layers(entry.layer, include_self=True):
            mode = internals.remat_mode(sub)
            if mode is not None:
                raise ValueError(
                    f"Layer '{entry.path}' contains '{sub.name}', created "
                    f"under keras.RematScope (mode={mode!r})"
                    "; Keras' own rematerialization fails inside "
                    "tf.function for layers called with keyword arguments "
                    "and would recompute twice. Create the model outside "
                    "RematScope."
                )


def _list_paths(entries, limit=40):
    paths = [f"{e.path} ({type(e.layer).__name__})" for e in entries]
    more = len(paths) - limit
    text = ", ".join(paths[:limit]) or "(none)"
    return text + (f", ... ({more} more)" if more > 0 else "")


# -- the checkpointed call -----------------------------------------------


def _checkpointed(layer, call):
    """`call` wrapped so that its activations are recomputed, not kept."""

    @functools.wraps(call)
    def checkpointed(*args, **kwargs):
        flat = tf.nest.flatten((args, kwargs))
        # Only float tensors can receive gradients; they go to
        # recompute_grad positionally (tf.custom_gradient takes no keyword
        # arguments in graph mode). Masks, flags and None are closed over.
        where = [i for i, x in enumerate(flat) if _is_float_tensor(x)]
        masks = [internals.get_keras_mask(flat[i]) for i in where]
        replay = _Replay(layer)

        def run(*tensors):
            leaves = list(flat)
            for i, tensor, mask in zip(where, tensors, masks, strict=True):
                if mask is not None:
                    # recompute_grad hands the recomputation fresh tensors,
                    # without the `_keras_mask` the forward pass saw.
                    internals.set_keras_mask(tensor, mask)
                leaves[i] = tensor
            call_args, call_kwargs = tf.nest.pack_sequence_as(
                (args, kwargs), leaves
            )
            with replay.scope():
                return call(*call_args, **call_kwargs)

        return tf.recompute_grad(run)(*[flat[i] for i in where])

    setattr(checkpointed, _MARK, True)
    return checkpointed


def _is_float_tensor(x):
    return tf.is_tensor(x) and x.dtype.is_floating


def _seed_generators(layer):
    found = []
    for sub in internals.flatten_layers(layer, include_self=True):
        found.extend(internals.layer_seed_generators(sub))
    # Unseeded random ops (seed=None) draw from Keras' global generator.
    global_generator = internals.global_seed_generator()
    if global_generator is not None:
        found.append(global_generator)
    return found


class _Replay:
    """The forward pass's Keras context, to recompute a block the same way.

    Built when the block is called (before its forward computation); the
    first `scope()` is the forward pass itself, every later one a
    recomputation.
    """

    def __init__(self, layer):
        self.layer = layer
        self.autocast_dtype = internals.autocast_dtype()
        self.context = internals.call_context_values()
        # Snapshot (not a reference): the forward pass advances the state.
        self.seeds = [
            (g.state, tf.identity(g.state.value))
            for g in _seed_generators(layer)
        ]
        self.forward_done = False

    @contextlib.contextmanager
    def scope(self):
        if not self.forward_done:
            self.forward_done = True
            yield
            return
        with (
            internals.call_context(
                self.layer, self.context, self.autocast_dtype
            ),
            keras.StatelessScope(
                state_mapping=self.seeds, initialize_variables=False
            ),
        ):
            yield
