"""Tiny keras_hub backbones and an HF-weights oracle for interop tests.

The oracle is keras_hub's own Hugging Face converter
(`keras_hub/src/utils/transformers/convert_{bert,gpt2}.py`): given HF
tensors it assigns a float backbone's kernels, independently of our name
table, so a QLoRA model loaded through `keras_qlora.interop` must compute
what that float backbone computes.
"""

import keras
import keras_hub
import numpy as np
from keras_hub.src.utils.transformers import convert_bert
from keras_hub.src.utils.transformers import convert_gpt2

import keras_qlora
from keras_qlora.quantizers import dequantize_nf4

HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 2
BERT_TARGETS = (
    "query",
    "key",
    "value",
    "attention_output",
    "feedforward_intermediate_dense",
    "feedforward_output_dense",
)
GPT2_TARGETS = BERT_TARGETS


def tiny_bert(seed=0):
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=64,
        num_layers=LAYERS,
        num_heads=2,
        hidden_dim=HIDDEN,
        intermediate_dim=INTERMEDIATE,
        max_sequence_length=16,
    )
    return _randomized(backbone, seed)


def tiny_gpt2(seed=0, hidden=HIDDEN, layers=LAYERS):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64,
        num_layers=layers,
        num_heads=2,
        hidden_dim=hidden,
        intermediate_dim=2 * hidden,
        max_sequence_length=16,
    )
    return _randomized(backbone, seed)


def clone(backbone):
    copy = type(backbone).from_config(backbone.get_config())
    copy.set_weights(backbone.get_weights())
    return copy


def qlora(backbone, targets=BERT_TARGETS, **kwargs):
    kwargs.setdefault("rank", 4)
    kwargs.setdefault("alpha", 8)
    kwargs.setdefault("block_size", 64)
    return keras_qlora.apply(
        clone(backbone), target_modules=targets, verbose=False, **kwargs
    )


def inputs(kind, batch=2, length=8, seed=3):
    rng = np.random.default_rng(seed)
    x = {
        "token_ids": rng.integers(0, 64, (batch, length)).astype("int32"),
        "padding_mask": np.ones((batch, length), "int32"),
    }
    if kind == "bert":
        x["segment_ids"] = np.zeros((batch, length), "int32")
    return x


def output(model, kind):
    out = model(inputs(kind))
    if isinstance(out, dict):
        out = out["sequence_output"]
    return keras.ops.convert_to_numpy(out)


def hf_linear_weights(kind, seed=5, hidden=HIDDEN, layers=LAYERS):
    """`{module: (weight [out, in], bias [out])}` of the bare HF model."""
    rng = np.random.default_rng(seed)
    inter = INTERMEDIATE if kind == "bert" else 2 * hidden
    if kind == "bert":
        shapes = {}
        for i in range(layers):
            block = f"encoder.layer.{i}"
            for name in ("query", "key", "value"):
                shapes[f"{block}.attention.self.{name}"] = (hidden, hidden)
            shapes[f"{block}.attention.output.dense"] = (hidden, hidden)
            shapes[f"{block}.intermediate.dense"] = (inter, hidden)
            shapes[f"{block}.output.dense"] = (hidden, inter)
        shapes["pooler.dense"] = (hidden, hidden)
    else:
        shapes = {}
        for i in range(layers):
            shapes[f"h.{i}.attn.c_attn"] = (3 * hidden, hidden)
            shapes[f"h.{i}.attn.c_proj"] = (hidden, hidden)
            shapes[f"h.{i}.mlp.c_fc"] = (inter, hidden)
            shapes[f"h.{i}.mlp.c_proj"] = (hidden, inter)
    return {
        module: (
            (rng.standard_normal(shape) * 0.1).astype(np.float32),
            (rng.standard_normal(shape[0]) * 0.1).astype(np.float32),
        )
        for module, shape in shapes.items()
    }


def port_hf_weights(backbone, kind, weights):
    """Assigns HF `{module: (weight [out, in], bias)}` to a float keras_hub
    backbone through keras_hub's own converter (the oracle)."""
    tensors = {}
    for module, (weight, bias) in weights.items():
        # GPT-2 checkpoints hold Conv1D weights [in, out].
        tensors[f"{module}.weight"] = weight.T if kind == "gpt2" else weight
        tensors[f"{module}.bias"] = bias
    loader = _DictLoader(tensors)
    if kind == "bert":
        convert_bert.convert_weights(backbone, loader, {})
    else:
        hidden = backbone.hidden_dim
        convert_gpt2.convert_weights(backbone, loader, {"n_embd": hidden})
    missing = set(tensors) - loader.used
    assert not missing, f"the converter did not use {sorted(missing)}"


def dequantized_kernel(layer):
    """A QLoRA layer's NF4 kernel in its Keras (EinsumDense) layout."""
    kernel_2d = dequantize_nf4(layer.nf4_state())
    plan = getattr(layer, "plan", None)
    if plan is None:
        return kernel_2d
    return keras.ops.convert_to_numpy(plan.kernel_from_2d(kernel_2d))


def float_layers(backbone):
    from keras_qlora import surgery

    return {
        e.path: e.layer
        for e in surgery.walk(backbone)
        if isinstance(e.layer, (keras.layers.Dense, keras.layers.EinsumDense))
    }


class _DictLoader:
    """The two methods keras_hub's converters call on a checkpoint loader;
    keys it does not have (embeddings, norms) keep the backbone's values."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.used = set()

    def get_tensor(self, key):
        if key not in self.tensors:
            raise KeyError(key)
        self.used.add(key)
        return self.tensors[key]

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
        if hf_weight_key not in self.tensors:
            return
        value = self.get_tensor(hf_weight_key)
        if hook_fn is not None:
            value = hook_fn(value, list(keras_variable.shape))
        keras_variable.assign(value)


def _randomized(backbone, seed):
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        value = rng.standard_normal(variable.shape) * 0.1
        if "gamma" in variable.path:
            value += 1.0
        variable.assign(value.astype("float32"))
    return backbone
