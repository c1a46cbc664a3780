"""Small presets for the loading tests, written by the real savers.

Hugging Face layout: a random-init `transformers` model saved with
`save_pretrained` (sharded when asked). keras_hub layout: keras_hub loads
that directory and writes it back with its own `save_to_preset`.
"""

import os

import numpy as np

# family -> (transformers config class, model class, config, keras_hub
# backbone class name)
_TINY = dict(vocab_size=320, max_position_embeddings=64)
FAMILIES = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(_TINY, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2),
        "LlamaBackbone",
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(_TINY, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, sliding_window=None),
        "MistralBackbone",
    ),
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(_TINY, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, head_dim=16),
        "GemmaBackbone",
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(_TINY, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False),
        "QwenBackbone",
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=320, n_positions=64, n_embd=64, n_layer=2,
             n_head=4),
        "GPT2Backbone",
    ),
    "bert": (
        "BertConfig",
        "BertModel",
        dict(vocab_size=320, hidden_size=64, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=64),
        "BertBackbone",
    ),
}  # fmt: skip


def write_hf_preset(directory, family, dtype="float32", sharded=False):
    """Saves a random `transformers` model of `family`; returns the dir."""
    import torch
    import transformers

    config_name, model_name, kwargs, _ = FAMILIES[family]
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    model = model.to(getattr(torch, dtype))
    shard = "60KB" if sharded else "10GB"
    model.save_pretrained(str(directory), max_shard_size=shard)
    return str(directory)


def write_keras_preset(directory, family, hf_dir, sharded=False):
    """Loads `hf_dir` with keras_hub and saves it in keras_hub's format."""
    import keras_hub

    backbone_cls = getattr(keras_hub.models, FAMILIES[family][3])
    backbone = backbone_cls.from_preset(hf_dir)
    # max_shard_size is in GB; a tiny size gives several shards.
    backbone.save_to_preset(
        str(directory), max_shard_size=0.0001 if sharded else 10
    )
    return str(directory)


def backbone_class(family):
    import keras_hub

    return getattr(keras_hub.models, FAMILIES[family][3])


def backbone_inputs(family, length=7, batch=2):
    rng = np.random.default_rng(0)
    inputs = {
        "token_ids": rng.integers(1, 300, (batch, length)).astype("int32"),
        "padding_mask": np.ones((batch, length), "int32"),
    }
    if family == "bert":
        inputs["segment_ids"] = np.zeros((batch, length), "int32")
    return inputs


def weight_files(directory):
    return sorted(
        f for f in os.listdir(directory)
        if f.endswith((".safetensors", ".h5"))
    )
