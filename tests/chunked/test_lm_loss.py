"""Chunked LM loss equals the loss `fit` computes from full logits."""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from chunked_models import gpt2
from chunked_models import inputs

import keras_qlora
from keras_qlora import internals
from keras_qlora.chunked import lm_loss

CHUNK = 8


def _task(name, **apply_kwargs):
    keras.utils.set_random_seed(0)
    if name == "gpt2":  # tied embeddings
        task = keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None)
    else:  # untied LM head
        backbone = keras_hub.models.LlamaBackbone(
            vocabulary_size=61,
            num_layers=2,
            hidden_dim=32,
            num_query_heads=4,
            num_key_value_heads=2,
            intermediate_dim=48,
            tie_word_embeddings=False,
        )
        task = keras_hub.models.LlamaCausalLM(
            backbone=backbone, preprocessor=None
        )
    model = keras_qlora.apply(task, rank=4, verbose=False, **apply_kwargs)
    for v in model.trainable_variables:
        v.assign(np.random.default_rng(1).normal(0, 0.1, v.shape))
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _batch(name):
    x = inputs(name)
    y = np.roll(x["token_ids"], -1, axis=1)
    return x, y, x["padding_mask"].astype("float32")


def _loss_and_grads(model, chunk_size):
    x, y, sw = _batch("llama")
    with tf.GradientTape() as tape:
        if chunk_size is None:
            loss = internals.compute_loss(
                model,
                x=x,
                y=y,
                y_pred=model(x, training=True),
                sample_weight=sw,
                training=True,
            )
        else:
            loss = lm_loss.causal_lm_loss(model, x, y, sw, chunk_size)
    return loss.numpy(), tape.gradient(loss, model.trainable_variables)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_loss_and_gradients_equal_the_plain_path(name):
    model = _task(name)
    plain, plain_grads = _loss_and_grads(model, None)
    loss, grads = _loss_and_grads(model, CHUNK)
    np.testing.assert_allclose(loss, plain, rtol=1e-6)
    for g, p in zip(grads, plain_grads, strict=True):
        scale = float(np.abs(p).max())
        np.testing.assert_allclose(g, p, atol=1e-5 * scale, rtol=1e-4)


def test_padding_tokens_are_ignored():
    model = _task("llama")
    x, y, sw = _batch("llama")
    other = y.copy()
    other[sw == 0] = 3  # labels under padding change nothing
    a = lm_loss.causal_lm_loss(model, x, y, sw, CHUNK)
    b = lm_loss.causal_lm_loss(model, x, other, sw, CHUNK)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-7)


def test_head_gradients_when_the_head_trains():
    # modules_to_save makes the (tied) embedding trainable: its gradient
    # comes through the chunked head as well.
    keras.utils.set_random_seed(0)
    task = keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None)
    model = keras_qlora.apply(
        task, rank=4, modules_to_save=["token_embedding"], verbose=False
    )
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    plain, plain_grads = _loss_and_grads(model, None)
    loss, grads = _loss_and_grads(model, 5)
    np.testing.assert_allclose(loss, plain, rtol=1e-6)
    for g, p in zip(grads, plain_grads, strict=True):
        g = tf.convert_to_tensor(g).numpy()
        p = tf.convert_to_tensor(p).numpy()
        scale = float(np.abs(p).max())
        np.testing.assert_allclose(g, p, atol=1e-5 * scale, rtol=1e-4)


def test_fit_with_chunked_loss_matches_plain_fit(tmp_path):
    x, y, sw = _batch("llama")
    runs = []
    for chunk in (None, CHUNK):
        model = _task("llama", lm_loss_chunk_size=chunk)
        history = model.fit(
            x, y, sample_weight=sw, batch_size=2, epochs=2, verbose=0
        )
        runs.append((history.history["loss"], model.trainable_variables))
    (plain_loss, plain_vars), (loss, variables) = runs
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-5)
    for v, p in zip(variables, plain_vars, strict=True):
        np.testing.assert_allclose(v.numpy(), p.numpy(), atol=1e-6)
    path = str(tmp_path / "lm.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.training_options.lm_loss_chunk_size == CHUNK


def test_refusals():
    model = _task("llama", lm_loss_chunk_size=CHUNK)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y, sw = _batch("llama")
    with pytest.raises(ValueError, match="from_logits=True"):
        model.fit(x, y, sample_weight=sw, verbose=0)
    with pytest.raises(ValueError, match="lm_loss_chunk_size: model"):
        keras_qlora.apply(gpt2(), lm_loss_chunk_size=4, verbose=False)
    with pytest.raises(TypeError, match="lm_loss_chunk_size=1.5"):
        keras_qlora.apply(gpt2(), lm_loss_chunk_size=1.5, verbose=False)
