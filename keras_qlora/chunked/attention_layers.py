"""Chunked attention on the attention layers of Keras and keras_hub models.

`enable_chunked_attention(model, chunk_size)` finds the attention layers it
knows and replaces, on each instance, the method the layer's `call` uses to
turn projected `(query, key, value, attention_mask)` into the attention
output (`_compute_attention`, through `internals.set_compute_attention`) by
a hook that runs `chunked.attention.chunked_attention` with the layer's
own scale, soft cap, sliding window and masks. Everything else the layer
does (projections, rotary embeddings, the KV cache, the output projection)
runs unchanged. Queries no longer than `chunk_size` (a decoding step with
a KV cache, short inputs) go to the layer's own method.

Families (keras_hub 0.32, Keras 3.15):
- Keras `MultiHeadAttention` and its subclasses (keras_hub
  `CachedMultiHeadAttention`: BERT's `TransformerEncoder`, GPT-2's
  `TransformerDecoder`), standard attention axes only;
- keras_hub `LlamaAttention`, `CachedMistralAttention`, `QwenAttention`
  (rotary embeddings, grouped-query heads, Qwen's sliding window);
- keras_hub `CachedGemmaAttention` (grouped-query heads, logit soft cap,
  sliding window).

Dropout on the attention probabilities (Keras `MultiHeadAttention`'s
`dropout`, Gemma's `dropout`) is not reproduced: in training with a rate
above 0, a chunked layer raises a ValueError naming the layer and the
setting. Inference (training=False) is unaffected by that rate.
"""

import keras

from keras_qlora import internals
from keras_qlora import surgery
from keras_qlora.chunked.attention import chunked_attention
from keras_qlora.wrapper import unwrap

# Marks our hooks: never installed twice, found and removed by this mark.
_MARK = "_keras_qlora_chunk_size"

_ROTARY = ("LlamaAttention", "CachedMistralAttention", "QwenAttention")
_GEMMA = ("CachedGemmaAttention",)

RECOGNIZED_LAYERS = (
    "keras.layers.MultiHeadAttention (and subclasses, e.g. keras_hub's "
    "CachedMultiHeadAttention in BERT / GPT-2 blocks), keras_hub "
    + ", ".join(_ROTARY + _GEMMA)
)


def check_chunk_size(value, name="attention_chunk_size"):
    """`value` if it is None or a positive int.

    Raises:
        TypeError: not an int (bools refused).
        ValueError: below 1.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be a positive int or None. Received: "
            f"{name}={value!r} ({type(value).__name__})"
        )
    if value < 1:
        raise ValueError(
            f"{name} must be a positive int or None. Received: {name}={value}"
        )
    return value


def attention_layers(model) -> list:
    """`(path, layer)` of the attention layers chunking knows, model order.

    Args:
        model: a `QLoRAModel` (its base model is searched) or a Keras
            model or layer.
    """
    return [
        (entry.path, entry.layer)
        for entry in surgery.walk(unwrap(model))
        if _family(entry.layer) is not None
    ]


def enable_chunked_attention(model, chunk_size) -> list[str]:
    """Makes the model's attention layers compute attention by chunks.

    Outputs and gradients equal the layers' own within float32 rounding
    (about 1e-6 relative); no `(batch, heads, seq, seq)` tensor is formed,
    forward or backward. Calling it again replaces the chunk size.

    Args:
        model: a `QLoRAModel` or a Keras model or layer.
        chunk_size: query rows per chunk and keys per block (int > 0).

    Returns:
        The paths of the chunked layers.

    Raises:
        TypeError / ValueError: `chunk_size` is not a positive int.
        ValueError: the model has no attention layer chunking knows.

    Example:
    >>> layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    >>> enable_chunked_attention(layer, 64)
    ['multi_head_attention']
    """
    check_chunk_size(chunk_size)
    root = unwrap(model)
    found = [(p, layer) for p, layer in attention_layers(root)]
    if not found:
        raise ValueError(
            f"attention_chunk_size: model '{root.name}' has no attention "
            f"layer that chunked attention supports. Supported: "
            f"{RECOGNIZED_LAYERS}."
        )
    for _, layer in found:
        internals.set_compute_attention(layer, _hook(layer, chunk_size))
    return [path for path, _ in found]


def disable_chunked_attention(model) -> list[str]:
    """Puts the layers' own attention back; returns the paths changed."""
    paths = []
    for path, layer in attention_layers(model):
        if getattr(internals.compute_attention_override(layer), _MARK, None):
            internals.set_compute_attention(layer, None)
            paths.append(path)
    return paths


def chunk_size_of(model):
    """The chunk size installed on the model's attention layers, or None."""
    for _, layer in attention_layers(model):
        size = getattr(internals.compute_attention_override(layer), _MARK, 0)
        if size:
            return size
    return None


def _family(layer):
    if isinstance(layer, keras.layers.MultiHeadAttention):
        return "mha"
    names = {cls.__name__ for cls in type(layer).__mro__}
    if names & set(_ROTARY):
        return "rotary"
    if names & set(_GEMMA):
        return "gemma"
    return None


def _hook(layer, chunk_size):
    family = _family(layer)
    own = internals.compute_attention_method(layer)
    make = {"mha": _mha_hook, "rotary": _rotary_hook, "gemma": _gemma_hook}
    hook = make[family](layer, own, chunk_size)
    setattr(hook, _MARK, chunk_size)
    return hook


def _short(query, chunk_size):
    """Whether the query length is known and fits in one chunk."""
    length = query.shape[1]
    return length is not None and length <= chunk_size


def _refuse_dropout(layer, rate, training, setting):
    if rate > 0 and training is not None and training is not False:
        raise ValueError(
            f"attention_chunk_size: layer '{layer.name}' "
            f"({type(layer).__name__}) has dropout on its attention "
            f"probabilities ({setting}={rate}), which chunked attention does "
            "not reproduce. Build the model with that dropout at 0 (e.g. "
            "`Backbone.from_preset(..., dropout=0.0)`), or train without "
            "attention_chunk_size."
        )


def _mha_hook(layer, own, chunk_size):
    scale = internals.attention_scale(layer)
    rate = internals.attention_dropout_rate(layer)
    axes = internals.attention_axes(layer)

    def compute(
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        **kw,
    ):
        plain = (
            return_attention_scores
            or query.shape.rank != 4
            or axes != (1,)
            or _short(query, chunk_size)
        )
        if plain:
            return own(
                query,
                key,
                value,
                attention_mask,
                training,
                return_attention_scores,
                **kw,
            )
        _refuse_dropout(layer, rate, training, "dropout")
        out = chunked_attention(
            query,
            key,
            value,
            attention_mask,
            scale=scale,
            chunk_size=chunk_size,
            causal=bool(kw.get("use_causal_mask", False)),
        )
        return out, None

    return compute


def _rotary_hook(layer, own, chunk_size):
    scale = internals.attention_scale(layer)

    def compute(query, key, value, attention_mask=None, **kw):
        if _short(query, chunk_size):
            return own(query, key, value, attention_mask, **kw)
        window = None
        if getattr(layer, "use_sliding_window_attention", False):
            window = layer.sliding_window_size  # Qwen
        return chunked_attention(
            query,
            key,
            value,
            attention_mask,
            scale=scale,
            chunk_size=chunk_size,
            window=window,
            query_offset=kw.get("cache_update_index") or 0,
        )

    return compute


def _gemma_hook(layer, own, chunk_size):
    def compute(q, k, v, attention_mask, training=False, cache_update_index=0):
        if _short(q, chunk_size):
            return own(q, k, v, attention_mask, training, cache_update_index)
        _refuse_dropout(layer, layer.dropout, training, "dropout")
        if layer.query_head_dim_normalize:
            scale = layer.head_dim**-0.5
        else:
            scale = (layer.hidden_dim // layer.num_query_heads) ** -0.5
        window = None
        if layer.use_sliding_window_attention:
            window = layer.sliding_window_size
        return chunked_attention(
            q,
            k,
            v,
            attention_mask,
            scale=scale,
            chunk_size=chunk_size,
            soft_cap=layer.logit_soft_cap,
            window=window,
            query_offset=cache_update_index,
        )

    return compute
