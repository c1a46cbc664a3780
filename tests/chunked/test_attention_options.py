"""`apply(attention_chunk_size=)`: validation, fit, `.keras`, generate,
dropout refusal."""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from chunked_models import gpt2
from chunked_models import inputs
from chunked_models import llama

import keras_qlora
from keras_qlora.chunked import attention_layers
from keras_qlora.chunked.attention import chunked_attention


@pytest.mark.parametrize(
    "value, error, match",
    [
        (0, ValueError, "attention_chunk_size=0"),
        (-4, ValueError, "attention_chunk_size=-4"),
        (2.5, TypeError, "attention_chunk_size=2.5"),
        (True, TypeError, "attention_chunk_size=True"),
        ("64", TypeError, "attention_chunk_size='64'"),
    ],
)
def test_bad_chunk_size_is_refused_before_editing(value, error, match):
    backbone = llama()
    trainable = len(backbone.trainable_weights)
    with pytest.raises(error, match=match):
        keras_qlora.apply(backbone, attention_chunk_size=value, verbose=False)
    assert len(backbone.trainable_weights) == trainable  # nothing frozen


def test_model_without_attention_is_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="attention_chunk_size: model"):
        keras_qlora.apply(
            model,
            target_modules="all-linear",
            attention_chunk_size=8,
            verbose=False,
        )


def test_fit_and_keras_round_trip_keep_the_setting(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras_qlora.apply(
        llama(), rank=4, attention_chunk_size=8, verbose=False
    )
    assert attention_layers.chunk_size_of(model) == 8
    x = inputs("llama", batch=4)
    y = np.random.default_rng(0).normal(size=(4, 37, 32)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    before = model.predict(x, verbose=0)
    history = model.fit(x, y, epochs=2, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after = model.predict(x, verbose=0)
    assert not np.allclose(before, after)  # the LoRA weights trained
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.training_options.attention_chunk_size == 8
    assert attention_layers.chunk_size_of(loaded) == 8
    np.testing.assert_allclose(loaded.predict(x, verbose=0), after, atol=1e-5)


def test_dropout_in_training_is_refused_with_the_layer_name():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=61,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=64,
        dropout=0.1,
    )
    model = keras_qlora.apply(backbone, attention_chunk_size=8, verbose=False)
    x = inputs("gpt2")
    model(x, training=False)  # inference: no dropout, runs
    with pytest.raises(
        ValueError, match=r"layer 'self_attention'.*dropout=0.1"
    ):
        model(x, training=True)


def test_generate_with_a_kv_cache_is_unchanged():
    keras.utils.set_random_seed(0)
    lm = keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None)
    prompt = {
        "token_ids": np.array([[5, 6, 7] + [0] * 21], "int32"),
        "padding_mask": np.array([[1] * 3 + [0] * 21], "bool"),
    }
    model = keras_qlora.apply(lm, rank=4, verbose=False)
    model.base_model.compile(sampler="greedy")
    plain = model.generate(prompt, stop_token_ids=None)
    attention_layers.enable_chunked_attention(model, 4)
    model.base_model.generate_function = None  # retrace with the hooks
    # The prompt pass (24 tokens) is chunked; the 1-token steps are not.
    chunked = model.generate(prompt, stop_token_ids=None)
    np.testing.assert_array_equal(chunked["token_ids"], plain["token_ids"])


def test_mask_of_size_one_axes_and_no_mask():
    rng = np.random.default_rng(0)
    q = tf.constant(rng.normal(size=(2, 11, 4, 8)), tf.float32)
    k = tf.constant(rng.normal(size=(2, 11, 2, 8)), tf.float32)
    v = tf.constant(rng.normal(size=(2, 11, 2, 8)), tf.float32)
    keys = rng.random((2, 1, 11)) > 0.2
    full = chunked_attention(
        q, k, v, np.broadcast_to(keys, (2, 11, 11)), scale=0.3, chunk_size=64
    )
    small = chunked_attention(q, k, v, keys, scale=0.3, chunk_size=3)
    np.testing.assert_allclose(small, full, atol=1e-6)
    ones = chunked_attention(q, k, v, None, scale=0.3, chunk_size=4)
    every = chunked_attention(
        q, k, v, np.ones((2, 11, 11), bool), scale=0.3, chunk_size=11
    )
    np.testing.assert_allclose(ones, every, atol=1e-6)
