"""Tiny random-weight keras_hub backbones for the chunking tests."""

import keras_hub
import numpy as np

SEQ = 37  # not a multiple of the chunk sizes used


def _common(**kw):
    return dict(vocabulary_size=61, num_layers=2, hidden_dim=32, **kw)


def bert():
    return keras_hub.models.BertBackbone(
        **_common(num_heads=4, intermediate_dim=48, max_sequence_length=64),
        dropout=0.0,
    )


def gpt2():
    return keras_hub.models.GPT2Backbone(
        **_common(num_heads=4, intermediate_dim=48, max_sequence_length=64),
        dropout=0.0,
    )


def llama():
    return keras_hub.models.LlamaBackbone(
        **_common(num_query_heads=4, num_key_value_heads=2),
        intermediate_dim=48,
    )


def mistral():
    return keras_hub.models.MistralBackbone(
        **_common(num_query_heads=4, num_key_value_heads=2),
        intermediate_dim=48,
        sliding_window=16,
    )


def qwen():
    return keras_hub.models.QwenBackbone(
        **_common(num_query_heads=4, num_key_value_heads=2),
        intermediate_dim=48,
        use_sliding_window_attention=True,
        sliding_window_size=12,
    )


def gemma():
    # Gemma 2 options: soft cap and a sliding window on alternate layers.
    return keras_hub.models.GemmaBackbone(
        **_common(num_query_heads=4, num_key_value_heads=2),
        intermediate_dim=48,
        head_dim=8,
        query_head_dim_normalize=False,
        attention_logit_soft_cap=50.0,
        use_sliding_window_attention=True,
        sliding_window_size=10,
    )


FAMILIES = {
    "bert": bert,
    "gpt2": gpt2,
    "llama": llama,
    "mistral": mistral,
    "qwen": qwen,
    "gemma": gemma,
}


def inputs(name, batch=2, seq=SEQ, seed=0):
    """Token ids with right padding in the second row (and segment ids for
    BERT)."""
    rng = np.random.default_rng(seed)
    padding = np.ones((batch, seq), "int32")
    padding[1, seq - 9 :] = 0
    x = {
        "token_ids": rng.integers(1, 61, (batch, seq)).astype("int32"),
        "padding_mask": padding,
    }
    if name == "bert":
        x["segment_ids"] = np.zeros((batch, seq), "int32")
    return x
