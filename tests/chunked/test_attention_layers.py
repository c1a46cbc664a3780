"""Chunked attention on keras_hub models equals their own attention.

Each family (BERT, GPT-2, Llama, Mistral, Qwen, Gemma with soft cap and
sliding window) runs the same QLoRA model with and without
`enable_chunked_attention`, at 37 tokens with chunks of 8 (37 is not a
multiple of 8) and right padding in one row: outputs, the gradients of the
LoRA weights and of the token embeddings' output must agree within
`|a - b| <= RTOL * |b| + ATOL * max|b|` (float32 rounding of a different
summation order).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from chunked_models import FAMILIES
from chunked_models import inputs

import keras_qlora
from keras_qlora.chunked import attention_layers

ATOL = 1e-5
RTOL = 1e-4
CHUNK = 8


def assert_close(a, b):
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, atol=ATOL * scale, rtol=RTOL)


def _model(name):
    keras.utils.set_random_seed(1)
    backbone = FAMILIES[name]()
    model = keras_qlora.apply(
        backbone,
        rank=4,
        target_modules="all-linear",
        verbose=False,
    )
    # LoRA B starts at zero; make the adapters matter.
    for v in model.trainable_variables:
        v.assign(np.random.default_rng(2).normal(0, 0.1, v.shape))
    return model


def _run(model, x):
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        flat = tf.nest.flatten(out)
        weights = [
            tf.constant(np.random.default_rng(3).normal(size=o.shape), o.dtype)
            for o in flat
        ]
        loss = tf.add_n(
            [tf.reduce_sum(o * w) for o, w in zip(flat, weights, strict=True)]
        )
    grads = tape.gradient(loss, model.trainable_variables)
    return [o.numpy() for o in flat], [g.numpy() for g in grads]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_outputs_and_gradients_equal_full_attention(name, monkeypatch):
    model = _model(name)
    x = inputs(name)
    full_out, full_grads = _run(model, x)
    paths = attention_layers.enable_chunked_attention(model, CHUNK)
    assert len(paths) == 2, paths
    calls = []
    chunked = attention_layers.chunked_attention
    monkeypatch.setattr(
        attention_layers,
        "chunked_attention",
        lambda *a, **k: calls.append(k) or chunked(*a, **k),
    )
    out, grads = _run(model, x)
    assert len(calls) == 2  # one per layer: the chunked path ran
    for a, b in zip(out + grads, full_out + full_grads, strict=True):
        assert_close(a, b)
    assert attention_layers.chunk_size_of(model) == CHUNK
    assert attention_layers.disable_chunked_attention(model) == paths
    assert attention_layers.chunk_size_of(model) is None
