"""Gradient checkpointing: same gradients, real recomputation, fit, errors."""

import json
import os
import re
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

import keras_qlora
from keras_qlora.remat import checkpointed_layers
from keras_qlora.remat import disable_gradient_checkpointing
from keras_qlora.remat import enable_gradient_checkpointing

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _apply(backbone, dropout=0.0):
    return keras_qlora.apply(
        backbone,
        rank=4,
        dropout=dropout,
        quantize_modules="all-linear",
        target_modules="all-linear",
        verbose=False,
    )


def _gpt2(dropout=0.0, seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=100,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=16,
        dropout=dropout,
    )
    rng = np.random.default_rng(seed)
    padding = np.ones((2, 16), "int32")
    padding[1, 11:] = 0
    x = {
        "token_ids": rng.integers(1, 100, (2, 16)).astype("int32"),
        "padding_mask": padding,
    }
    return _apply(backbone, dropout), x


def _bert(dropout=0.0):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
        dropout=dropout,
    )
    x = {
        "token_ids": np.arange(16, dtype="int32").reshape(2, 8) % 50,
        "segment_ids": np.zeros((2, 8), "int32"),
        "padding_mask": np.array([[1] * 8, [1] * 5 + [0] * 3], "int32"),
    }
    return _apply(backbone, dropout), x


def _gemma(dropout):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
        dropout=dropout,
    )
    x = {
        "token_ids": np.arange(16, dtype="int32").reshape(2, 8) % 50,
        "padding_mask": np.ones((2, 8), "int32"),
    }
    return _apply(backbone, dropout), x


def _masked_encoders():
    """Blocks whose padding mask only travels as the input's `_keras_mask`."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,), dtype="int32")
    h = keras.layers.Embedding(30, 16, mask_zero=True)(inputs)
    h = keras_hub.layers.TransformerEncoder(32, 2, name="enc0")(h)
    h = keras_hub.layers.TransformerEncoder(32, 2, name="enc1")(h)
    x = np.array([[3, 4, 5, 0, 0, 0, 0, 0], [7, 8, 9, 10, 11, 0, 0, 0]])
    return _apply(keras.Model(inputs, h)), x.astype("int32")


def _loss(outputs):
    flat = [tf.cast(t, "float32") for t in tf.nest.flatten(outputs)]
    return tf.add_n([tf.reduce_sum(t * t) for t in flat])


def _lora_gradients(model, x, graph):
    """(loss, gradients of the LoRA variables), seed states left as found."""
    generators = [
        g for sub in model._flatten_layers() for g in sub._seed_generators
    ]
    states = [g.state.numpy() for g in generators]

    def step():
        with tf.GradientTape() as tape:
            loss = _loss(model(x, training=True))
        return loss, tape.gradient(loss, model.trainable_variables)

    loss, grads = tf.function(step)() if graph else step()
    # Restore the dropout seeds: the next computation draws the same masks.
    for generator, state in zip(generators, states, strict=True):
        generator.state.assign(state)
    return float(loss), [np.asarray(g) for g in grads]


def _assert_same_gradients(model, x, graph, expected_paths):
    loss, grads = _lora_gradients(model, x, graph)
    assert enable_gradient_checkpointing(model) == expected_paths
    loss_ckpt, grads_ckpt = _lora_gradients(model, x, graph)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert len(grads) == len(model.trainable_variables) >= 8
    assert max(float(np.abs(g).max()) for g in grads) > 0
    for variable, want, got in zip(
        model.trainable_variables, grads, grads_ckpt, strict=True
    ):
        # Graph mode may order float32 sums differently: rtol 1e-5.
        np.testing.assert_allclose(
            got, want, rtol=1e-5, atol=1e-6, err_msg=variable.path
        )


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf_function"])
def test_gpt2_gradients_unchanged(graph):
    # With dropout, equal gradients mean the recomputation replayed the
    # forward pass's dropout masks (model and LoRA dropout).
    model, x = _gpt2(dropout=0.1)
    paths = ["transformer_layer_0", "transformer_layer_1"]
    _assert_same_gradients(model, x, graph, paths)


def test_bert_gradients_unchanged():
    # tf.function with BERT: see test_pure_tf_fallback_in_subprocess.
    model, x = _bert(dropout=0.1)
    paths = ["transformer_layer_0", "transformer_layer_1"]
    _assert_same_gradients(model, x, False, paths)


def test_gemma_block_inherits_training_in_the_recomputation():
    # GemmaDecoderBlock.call has no `training` argument: its dropout gets
    # training=True only from the Keras call context of the forward pass,
    # which the backward pass has left; the recomputation restores it.
    model, x = _gemma(dropout=0.3)
    _assert_same_gradients(
        model,
        x,
        graph=False,
        expected_paths=["decoder_block_0", "decoder_block_1"],
    )


def test_keras_mask_reaches_the_recomputation():
    model, x = _masked_encoders()
    _assert_same_gradients(
        model, x, graph=True, expected_paths=["enc0", "enc1"]
    )


def test_blocks_are_really_recomputed(monkeypatch):
    calls = []
    original = keras_hub.layers.TransformerDecoder.call

    def counting_call(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    model, x = _gpt2()
    # Patched after the blocks are built (Keras checks the signature of
    # `call` then) and before enabling: the checkpointed call wraps it.
    monkeypatch.setattr(
        keras_hub.layers.TransformerDecoder, "call", counting_call
    )
    _lora_gradients(model, x, graph=False)
    assert calls == ["transformer_layer_0", "transformer_layer_1"]
    enable_gradient_checkpointing(model)
    for graph in (False, True):
        del calls[:]
        _lora_gradients(model, x, graph=graph)
        # Forward pass, then the backward pass recomputes in reverse order.
        assert calls == [
            "transformer_layer_0",
            "transformer_layer_1",
            "transformer_layer_1",
            "transformer_layer_0",
        ]
    # Without a gradient, nothing is recomputed.
    del calls[:]
    model(x)
    assert calls == ["transformer_layer_0", "transformer_layer_1"]


def test_fit_matches_fit_without_checkpointing():
    histories = []
    for checkpointing in (False, True):
        model, x = _gpt2(dropout=0.1, seed=3)
        if checkpointing:
            enable_gradient_checkpointing(model)
        y = np.random.default_rng(1).standard_normal((2, 16, 64))
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        history = model.fit(x, y.astype("float32"), epochs=3, verbose=0)
        histories.append(history.history["loss"])
    without, with_ckpt = histories
    assert without[-1] < without[0]
    # Later losses depend on the earlier steps' gradients.
    np.testing.assert_allclose(with_ckpt, without, rtol=1e-5)


_PURE_TF_SCRIPT = """
import json, keras, keras_hub, numpy as np, tensorflow as tf
import keras_qlora
from keras_qlora.remat import enable_gradient_checkpointing
keras.utils.set_random_seed(0)
backbone = keras_hub.models.BertBackbone(
    vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=16,
    intermediate_dim=32, max_sequence_length=8, dropout=0.1)
model = keras_qlora.apply(backbone, rank=4, dropout=0.1, verbose=False,
    quantize_modules="all-linear", target_modules="all-linear")
x = {"token_ids": np.arange(16, dtype="int32").reshape(2, 8),
     "segment_ids": np.zeros((2, 8), "int32"),
     "padding_mask": np.ones((2, 8), "int32")}
gens = [g for s in model._flatten_layers() for g in s._seed_generators]
start = [g.state.numpy() for g in gens]
def grads():
    with tf.GradientTape() as tape:
        outputs = tf.nest.flatten(model(x, training=True))
        loss = tf.add_n([tf.reduce_sum(y * y) for y in outputs])
    return tape.gradient(loss, model.trainable_variables)
def run(graph):
    for g, s in zip(gens, start):
        g.state.assign(s)
    return [np.asarray(g) for g in (tf.function(grads)() if graph else grads())]
plain = [run(False), run(True)]
paths = enable_gradient_checkpointing(model)
ckpt = [run(False), run(True)]
diff = [max(float(np.abs(a - b).max()) for a, b in zip(p, c))
        for p, c in zip(plain, ckpt)]
print(json.dumps({"path": keras_qlora.ops.active_path()[0], "paths": paths,
    "diff": diff, "scale": max(float(np.abs(g).max()) for g in plain[0])}))
"""


def test_pure_tf_fallback_in_subprocess():
    # KERAS_QLORA_PURE_TF is read at first use: a fresh process.
    env = dict(os.environ, KERAS_QLORA_PURE_TF="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_ROOT, env.get("PYTHONPATH")) if p
    )
    done = subprocess.run(
        [sys.executable, "-c", _PURE_TF_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["path"] == "reference"
    assert result["paths"] == ["transformer_layer_0", "transformer_layer_1"]
    assert result["scale"] > 0
    assert result["diff"][0] <= 1e-6 and result["diff"][1] <= 1e-6, result


def test_selectors_nesting_and_undo():
    model, x = _gpt2()
    # Explicit selectors; a layer inside a selected block is dropped.
    names = ["transformer_layer_0", "feedforward_output_dense"]
    assert enable_gradient_checkpointing(model, blocks=names) == [
        "transformer_layer_0",
        "transformer_layer_1/feedforward_output_dense",
    ]
    assert enable_gradient_checkpointing(
        model, blocks=r"transformer_layer_1/self_attention/(query|value)"
    ) == [
        "transformer_layer_1/self_attention/query",
        "transformer_layer_1/self_attention/value",
    ]
    # Calling again replaces the selection; the call is wrapped once.
    expected = ["transformer_layer_0", "transformer_layer_1"]
    assert enable_gradient_checkpointing(model) == expected
    assert enable_gradient_checkpointing(model) == expected
    assert checkpointed_layers(model) == expected
    block = model.base_model.transformer_layers[0]
    wrapped = vars(block)["call"].__wrapped__
    assert wrapped.__func__ is keras_hub.layers.TransformerDecoder.call
    assert enable_gradient_checkpointing(
        model, blocks=lambda path, layer: path.endswith("_layer_1")
    ) == ["transformer_layer_1"]
    assert disable_gradient_checkpointing(model) == ["transformer_layer_1"]
    assert checkpointed_layers(model) == []
    assert "call" not in vars(model.base_model.transformer_layers[1])


@pytest.mark.parametrize(
    "make, expected",
    [
        (
            lambda: keras_hub.models.LlamaBackbone(
                vocabulary_size=50,
                num_layers=2,
                num_query_heads=2,
                num_key_value_heads=1,
                hidden_dim=16,
                intermediate_dim=32,
            ),
            ["transformer_layer_0", "transformer_layer_1"],
        ),
        (
            lambda: keras_hub.models.BartBackbone(
                vocabulary_size=50,
                num_layers=1,
                num_heads=2,
                hidden_dim=16,
                intermediate_dim=32,
                max_sequence_length=8,
            ),
            ["transformer_encoder_layer_0", "transformer_decoder_layer_0"],
        ),
    ],
    ids=["llama", "bart"],
)
def test_detects_blocks_of_plain_backbones(make, expected):
    assert enable_gradient_checkpointing(make()) == expected


def test_errors():
    dense = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="query")]
    )
    with pytest.raises(
        ValueError,
        match=r"No transformer blocks recognized(.|\n)*TransformerEncoder"
        r"(.|\n)*DecoderBlock(.|\n)*blocks=\['layer_0'(.|\n)*query \(Dense\)",
    ):
        enable_gradient_checkpointing(dense)
    with pytest.raises(TypeError, match=r"blocks must be True.*blocks=3"):
        enable_gradient_checkpointing(dense, blocks=3)
    with pytest.raises(TypeError, match=r"blocks must be True.*blocks=None"):
        enable_gradient_checkpointing(dense, blocks=None)
    with pytest.raises(ValueError, match=r"disable_gradient_checkpointing"):
        enable_gradient_checkpointing(dense, blocks=False)
    with pytest.raises(ValueError, match=r"blocks=\['nope'\] matched no layer"):
        enable_gradient_checkpointing(dense, blocks=["nope"])
    with pytest.raises(TypeError, match=r"Received: model of type str"):
        enable_gradient_checkpointing("model")
    with keras.RematScope(mode="full"):
        block = keras_hub.layers.TransformerEncoder(8, 2, name="enc")
    model = keras.Sequential([keras.Input((3, 8)), block])
    with pytest.raises(ValueError, match=re.escape("RematScope (mode='full')")):
        enable_gradient_checkpointing(model)


def _tiny_gpt2_float(seed=0):
    keras.utils.set_random_seed(seed)
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=100,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=16,
    )


def test_apply_option_checkpoints_blocks_and_survives_keras_file(tmp_path):
    q = keras_qlora.apply(
        _tiny_gpt2_float(), gradient_checkpointing=True, verbose=False
    )
    expected = ["transformer_layer_0", "transformer_layer_1"]
    assert q.remat_paths == expected
    assert keras_qlora.training.checkpointed_layers(q) == expected
    x = {
        "token_ids": np.arange(32, dtype="int32").reshape(2, 16) % 100,
        "padding_mask": np.ones((2, 16), "int32"),
    }
    path = str(tmp_path / "remat.keras")
    q.save(path)
    loaded = keras.saving.load_model(path)
    assert keras_qlora.training.checkpointed_layers(loaded) == expected
    assert loaded.get_config()["training"]["gradient_checkpointing"] == expected
    np.testing.assert_allclose(
        np.asarray(loaded(x)), np.asarray(q(x)), rtol=1e-5, atol=1e-5
    )


def test_apply_option_refuses_models_without_blocks_before_editing():
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4, name="query")]
    )
    with pytest.raises(ValueError, match="No transformer blocks recognized"):
        keras_qlora.apply(model, gradient_checkpointing=True, verbose=False)
    assert type(model.get_layer("query")) is keras.layers.Dense


def test_apply_option_with_a_selector():
    q = keras_qlora.apply(
        _tiny_gpt2_float(),
        gradient_checkpointing=["transformer_layer_1"],
        verbose=False,
    )
    assert q.remat_paths == ["transformer_layer_1"]


def test_opted_in_biases_train_inside_checkpointed_blocks():
    # TF differentiates through tf.recompute_grad only for variables that
    # were created trainable; opted-in biases must still get gradients.
    keras.utils.set_random_seed(0)
    backbone = _tiny_gpt2_float()
    q = keras_qlora.apply(
        backbone,
        target_modules="all-linear",
        bias="lora_only",
        gradient_checkpointing=True,
        verbose=False,
    )
    x = {
        "token_ids": np.arange(32, dtype="int32").reshape(2, 16) % 100,
        "padding_mask": np.ones((2, 16), "int32"),
    }
    biases = [v for v in q.trainable_variables if v.path.endswith("bias")]
    assert len(biases) >= 8
    with tf.GradientTape() as tape:
        loss = _loss(q(x, training=True))
    grads = tape.gradient(loss, biases)
    missing = [v.path for v, g in zip(biases, grads) if g is None]
    assert not missing
