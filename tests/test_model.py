"""QLoRAModel: model.fit trains only LoRA, and the .keras round trip."""

import os
import zipfile

import keras
import keras_hub
import numpy as np
import pytest

import keras_qlora
from keras_qlora import surgery
from keras_qlora.layers import QLoRALayerBase


def _task(seed=0, n=256):
    """A small regression task a LoRA adapter can fit: y = tanh(x W*)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 24)).astype("float32")
    y = np.tanh(x @ rng.standard_normal((24, 8)).astype("float32"))
    return x, y


def _model():
    return keras.Sequential(
        [
            keras.Input((24,)),
            keras.layers.Dense(64, activation="gelu", name="query"),
            keras.layers.Dense(64, activation="gelu", name="mlp"),
            keras.layers.Dense(8, name="value"),
        ]
    )


def _nf4_values(model):
    return {v.path: v.numpy().copy() for v in model.weights if not v.trainable}


def test_fit_lowers_loss_and_changes_only_lora():
    keras.utils.set_random_seed(0)
    x, y = _task()
    q = keras_qlora.apply(_model(), rank=8, verbose=False)
    frozen = _nf4_values(q)
    lora_before = {v.path: v.numpy().copy() for v in q.trainable_variables}
    q.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    history = q.fit(x, y, batch_size=32, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0]
    # The 4-bit bytes, the scales and the frozen biases are bit-identical.
    after = _nf4_values(q)
    assert frozen.keys() == after.keys() and len(frozen) >= 12
    for path, value in frozen.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    changed = [
        v.path
        for v in q.trainable_variables
        if not np.array_equal(v.numpy(), lora_before[v.path])
    ]
    assert sorted(changed) == sorted(lora_before)
    assert all("lora_" in p for p in changed)
    # No optimizer slots exist for frozen weights.
    slots = {v.path for v in q.optimizer.variables}
    assert not any("nf4_" in p or "bias" in p for p in slots)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_fit_under_mixed_precision(dtype_policy_guard, policy):
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    x, y = _task()
    q = keras_qlora.apply(_model(), rank=8, verbose=False)
    assert all(v.dtype == "float32" for v in q.trainable_variables)
    compute = policy.split("_")[1]
    assert keras.backend.standardize_dtype(q(x[:2]).dtype) == compute
    q.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    losses = q.fit(x, y, batch_size=32, epochs=6, verbose=0).history["loss"]
    assert losses[-1] < 0.8 * losses[0]
    # float16 needs loss scaling, which compile() adds for the wrapper's
    # policy; LoRA stays float32 either way.
    scaled = isinstance(q.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (policy == "mixed_float16")
    assert all(v.dtype == "float32" for v in q.trainable_variables)


def _trained(tmp_path):
    keras.utils.set_random_seed(1)
    x, y = _task(1)
    q = keras_qlora.apply(_model(), rank=4, modules_to_save=None, verbose=False)
    q.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    q.fit(x, y, batch_size=64, epochs=2, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    q.save(path)
    return q, path, x


def test_keras_round_trip_keeps_nf4_and_separate_lora(tmp_path):
    q, path, x = _trained(tmp_path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, keras_qlora.QLoRAModel)
    np.testing.assert_array_equal(
        restored.predict(x, verbose=0), q.predict(x, verbose=0)
    )
    # Keras reloads a Sequential's layers outside its name scope: the
    # float layers' paths, and so the QLoRA ones', lose `sequential_<n>/`.
    originals = {_layer_path(v): v for v in q.weights}
    for v in restored.weights:
        original = originals[_layer_path(v)]
        np.testing.assert_array_equal(v.numpy(), original.numpy())
        assert v.dtype == original.dtype, v.path
        assert v.trainable == original.trainable, v.path
    lora_b = [v for v in restored.weights if v.path.endswith("lora_b")]
    assert lora_b and all(np.abs(v.numpy()).max() > 0 for v in lora_b)
    # The file stores packed uint8 nibbles and separate LoRA matrices, not a
    # float (merged) kernel.
    datasets = _h5_datasets(path)
    packed = {k: v for k, v in datasets.items() if k.endswith("nf4_packed")}
    assert sorted(v for v in packed.values()) == sorted(
        [
            ((24 * 64 // 2,), "uint8"),
            ((64 * 64 // 2,), "uint8"),
            ((64 * 8 // 2,), "uint8"),
        ]
    )
    assert sum(k.endswith("lora_a") for k in datasets) == 2
    float_kernels = [(24, 64), (64, 64), (64, 8)]
    assert not any(shape in float_kernels for shape, _ in datasets.values())


def _layer_path(variable):
    """`<layer name>/<variable name>`."""
    return "/".join(variable.path.split("/")[-2:])


def _h5_datasets(path):
    """{dataset path: (shape, dtype)} of the weights file inside a .keras."""
    import h5py

    out = {}
    with (
        zipfile.ZipFile(path) as archive,
        archive.open("model.weights.h5") as raw,
        h5py.File(raw, "r") as h5,
    ):
        h5.visititems(
            lambda name, obj: (
                out.__setitem__(name, (obj.shape, obj.dtype.name))
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    return out


def test_round_trip_of_a_keras_hub_backbone(tmp_path):
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=300,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=16,
    )
    q = keras_qlora.apply(backbone, rank=4, verbose=False)
    for layer in (e.layer for e in surgery.walk(q.base_model)):
        if isinstance(layer, QLoRALayerBase) and layer.has_lora:
            layer.lora_b.assign(np.full(layer.lora_b.shape, 0.01, "float32"))
    x = {
        "token_ids": np.arange(24).reshape(2, 12) % 300,
        "segment_ids": np.zeros((2, 12), "int32"),
        "padding_mask": np.ones((2, 12), "int32"),
    }
    expected = q(x)["sequence_output"]
    path = os.path.join(tmp_path, "bert.keras")
    q.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_array_equal(restored(x)["sequence_output"], expected)
    assert len(restored.trainable_variables) == 2 * 3 * 2


def test_loading_into_a_mismatched_structure_fails_clearly(tmp_path):
    q, path, _ = _trained(tmp_path)
    config = q.get_config()
    config["replaced"].append({"path": "missing_layer", "lora": False})
    with pytest.raises(ValueError, match="'missing_layer'.*does not have"):
        keras_qlora.QLoRAModel.from_config(config)


def test_round_trip_of_a_functional_model_with_a_trainable_head(tmp_path):
    inp = keras.Input((24,))
    h = keras.layers.Dense(32, activation="relu", name="query")(inp)
    out = keras.layers.Dense(3, name="head")(h)
    q = keras_qlora.apply(
        keras.Model(inp, out), rank=4, modules_to_save=["head"], verbose=False
    )
    x, _ = _task()
    path = os.path.join(tmp_path, "functional.keras")
    q.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_array_equal(restored(x), q(x))
    assert [v.path for v in restored.trainable_variables] == [
        "query/lora_a",
        "query/lora_b",
        "head/kernel",
        "head/bias",
    ]


def _tiny_causal_lm():
    keras.utils.set_random_seed(3)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=16,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    return lm


def test_generate_is_forwarded_and_not_stale():
    lm = _tiny_causal_lm()
    prompt = {
        "token_ids": np.array([[5, 9, 3] + [0] * 9], "int32"),
        "padding_mask": np.array([[1, 1, 1] + [0] * 9], bool),
    }
    before = lm.generate(prompt, stop_token_ids=None)["token_ids"]
    q = keras_qlora.apply(lm, target_modules="all-linear", verbose=False)
    # A large adapter: generation must now run the QLoRA layers, not the
    # function keras_hub traced (and cached) for the float model.
    for layer in q.qlora_layers(lora_only=True).values():
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.5, "float32"))
    after = q.generate(prompt, stop_token_ids=None)["token_ids"]
    assert after.shape == before.shape
    assert not np.array_equal(after[0, 3:], before[0, 3:])
    with pytest.raises(AttributeError, match="has no generate"):
        keras_qlora.apply(_model(), verbose=False).generate(np.zeros((1, 24)))


def test_public_attributes_read_through_to_the_wrapped_model(tmp_path):
    lm = _tiny_causal_lm()
    backbone = lm.backbone
    q = keras_qlora.apply(lm, target_modules="all-linear", verbose=False)
    # Code written against the keras_hub task keeps working after apply.
    assert q.backbone is backbone
    assert q.preprocessor is None
    assert q.backbone.token_embedding is backbone.token_embedding
    assert q.backbone.transformer_layers is backbone.transformer_layers
    qb = keras_qlora.apply(
        _tiny_causal_lm().backbone, target_modules="all-linear", verbose=False
    )
    assert qb.token_embedding is qb.base_model.token_embedding
    assert len(qb.transformer_layers) == 1
    # The wrapper's own attributes win; private names never forward.
    assert q.name.startswith("qlora_")
    with pytest.raises(AttributeError, match="_tracker_of_base"):
        q._tracker_of_base
    with pytest.raises(AttributeError, match="neither has its base model"):
        q.no_such_attribute
    # Keras' tracking and serialization are unchanged: the wrapper holds the
    # base model's variables once, and a .keras round trip still works.
    assert len(q.weights) == len(lm.weights)
    for layer in q.qlora_layers(lora_only=True).values():
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.1, "float32"))
    batch = {
        "token_ids": np.array([[5, 9, 3, 7]], "int32"),
        "padding_mask": np.ones((1, 4), bool),
    }
    path = str(tmp_path / "lm.keras")
    q.save(path)
    # A saved task (its constructor compiles an optimizer) loads again.
    loaded = keras.saving.load_model(path)
    assert loaded.backbone.token_embedding.input_dim == 64
    np.testing.assert_allclose(
        np.asarray(loaded(batch)), np.asarray(q(batch)), rtol=1e-5, atol=1e-6
    )
