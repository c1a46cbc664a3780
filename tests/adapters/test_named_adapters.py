"""Several named adapters on one model: switch, disable, delete, train,
`.keras` round trip."""

import os

import keras
import numpy as np
import pytest
from adapter_helpers import assert_unchanged
from adapter_helpers import inputs
from adapter_helpers import qlora
from adapter_helpers import randomize
from adapter_helpers import snapshot

from keras_qlora import adapters


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """Adapter files A and B (different LoRA and head values), the outputs
    of a model holding each one alone, and of the NF4 base."""
    root = tmp_path_factory.mktemp("named")
    x = inputs()
    base = qlora()
    base_out = base(x).numpy()
    head = {v.path: v.numpy() for v in base.weights if "head" in v.path}
    expected = {}
    for tag, seed in (("a", 1), ("b", 2)):
        model = qlora()
        randomize(model, seed)
        expected[tag] = model(x).numpy()
        adapters.save_adapter(model, str(root / tag))
    return root, x, base_out, head, expected


def _loaded(root):
    model = qlora()
    adapters.load_adapter(model, str(root / "a"))
    adapters.load_adapter(model, str(root / "b"), name="b")
    return model


def test_outputs_switch_with_the_active_adapter(two_adapters):
    root, x, base_out, head, expected = two_adapters
    assert np.abs(expected["a"] - expected["b"]).max() > 0.1
    model = _loaded(root)
    assert adapters.list_adapters(model) == ["default", "b"]
    assert adapters.active_adapter(model) == "default"
    np.testing.assert_array_equal(model(x), expected["a"])
    adapters.set_adapter(model, "b")
    np.testing.assert_array_equal(model(x), expected["b"])
    # predict() traces a function; switching must not reuse a stale one.
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected["b"])
    adapters.set_adapter(model, "default")
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected["a"])
    adapters.set_adapter(model, "b")
    np.testing.assert_array_equal(model(x), expected["b"])


def test_disabled_adapters_give_the_nf4_base(two_adapters):
    root, x, base_out, head, _ = two_adapters
    model = qlora(head=True)
    adapters.load_adapter(model, str(root / "b"), name="b")  # head kept aside
    adapters.disable_adapters(model)
    assert not adapters.adapters_enabled(model)
    np.testing.assert_array_equal(model(x), base_out)
    assert all("head" in v.path for v in model.trainable_variables)
    adapters.enable_adapters(model)
    adapters.set_adapter(model, "b")
    assert np.abs(model(x).numpy() - base_out).max() > 0.1


def test_only_the_active_adapter_is_trainable(two_adapters):
    root, *_ = two_adapters
    model = _loaded(root)
    # Under the Sequential's path, as the float kernels were.
    base = model.base_model.name
    lora = [v.path for v in model.trainable_variables if "lora" in v.path]
    assert lora == [
        f"{base}/query/lora_a",
        f"{base}/query/lora_b",
        f"{base}/value/lora_a",
        f"{base}/value/lora_b",
    ]
    adapters.set_adapter(model, "b")
    lora = [v.path for v in model.trainable_variables if "lora" in v.path]
    assert lora == [
        f"{base}/query/lora_a_b",
        f"{base}/query/lora_b_b",
        f"{base}/value/lora_a_b",
        f"{base}/value/lora_b_b",
    ]


def test_fit_trains_the_active_adapter_only(two_adapters):
    root, x, *_ = two_adapters
    model = _loaded(root)
    adapters.set_adapter(model, "b")
    layer = model.qlora_layers()["query"]
    default_before = layer.lora_b.numpy().copy()
    b_before = layer.adapter_variables("b")[1].numpy().copy()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    y = np.zeros((len(x), 3), "float32")
    model.fit(x, y, epochs=2, verbose=0)
    np.testing.assert_array_equal(layer.lora_b, default_before)
    assert np.abs(layer.adapter_variables("b")[1] - b_before).max() > 0
    slots = {v.name for v in model.optimizer.variables}
    base = model.base_model.name
    assert f"{base}_query_lora_b_b_momentum" in slots
    assert f"{base}_query_lora_b_momentum" not in slots


def test_each_adapter_keeps_its_own_head(two_adapters):
    root, x, _, _, expected = two_adapters
    model = _loaded(root)
    adapters.set_adapter(model, "b")
    adapters.set_adapter(model, "default")
    np.testing.assert_array_equal(model(x), expected["a"])
    # Saving an inactive adapter writes its own head values.
    adapters.save_adapter(model, str(root / "b_again"), name="b")
    fresh = qlora()
    adapters.load_adapter(fresh, str(root / "b_again"))
    np.testing.assert_array_equal(fresh(x), expected["b"])


def test_add_and_delete(two_adapters):
    root, x, _, _, expected = two_adapters
    model = _loaded(root)
    n_weights = len(model.weights)
    adapters.add_adapter(model, "c")
    assert adapters.list_adapters(model) == ["default", "b", "c"]
    assert len(model.weights) == n_weights + 4
    adapters.set_adapter(model, "c")
    # A fresh adapter has B = 0: the NF4 base plus the current head.
    lora = [v for v in model.trainable_variables if "lora_b_c" in v.path]
    assert len(lora) == 2 and all(np.all(v.numpy() == 0) for v in lora)
    with pytest.raises(ValueError, match="Cannot delete adapter 'c'.*active"):
        adapters.delete_adapter(model, "c")
    with pytest.raises(ValueError, match="Cannot delete adapter 'default'"):
        adapters.delete_adapter(model, "default")
    adapters.set_adapter(model, "b")
    adapters.delete_adapter(model, "c")
    assert adapters.list_adapters(model) == ["default", "b"]
    assert len(model.weights) == n_weights
    assert not any("lora_a_c" in v.path for v in model.weights)
    np.testing.assert_array_equal(model(x), expected["b"])


def test_errors_name_the_adapters(two_adapters):
    root, *_ = two_adapters
    model = _loaded(root)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no adapter named 'z'.*'default'"):
        adapters.set_adapter(model, "z")
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        adapters.add_adapter(model, "b")
    with pytest.raises(ValueError, match="1-64 letters"):
        adapters.add_adapter(model, "my adapter")
    with pytest.raises(TypeError, match="must be a string"):
        adapters.add_adapter(model, 3)
    with pytest.raises(TypeError, match="expects the model returned by"):
        adapters.list_adapters(model.base_model)
    assert_unchanged(model, before)


def test_keras_file_keeps_every_adapter(two_adapters, tmp_path):
    root, x, _, _, expected = two_adapters
    model = _loaded(root)
    adapters.set_adapter(model, "b")
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert adapters.list_adapters(restored) == ["default", "b"]
    assert adapters.active_adapter(restored) == "b"
    np.testing.assert_array_equal(restored(x), expected["b"])
    trainable = [v.path for v in restored.trainable_variables]
    assert "query/lora_a_b" in trainable and "query/lora_a" not in trainable
    # The head of the inactive "default" is not in the .keras file: the
    # model holds one head; its values are the active adapter's.
    adapters.set_adapter(restored, "default")
    layer, original = (m.qlora_layers()["value"] for m in (restored, model))
    np.testing.assert_array_equal(layer.lora_b, original.lora_b)
    adapters.disable_adapters(restored)
    restored.save(path)
    again = keras.saving.load_model(path)
    assert not adapters.adapters_enabled(again)


def test_layer_store_is_checked_before_adapters_are_created():
    layer = qlora(head=False).qlora_layers()["query"]
    store = {}
    layer.save_own_variables(store)
    assert "adapter_state" not in store  # one adapter, enabled: as before
    store["lora_a.x"] = np.ones(layer.lora_a.shape, "float32")
    store["lora_b.x"] = np.ones((4, 33), "float32")
    with pytest.raises(ValueError, match=r"saved 'lora_b.x' has shape"):
        layer.load_own_variables(store)
    store["lora_b.x"] = np.ones(layer.lora_b.shape, "float32")
    store["adapter_state"] = np.array([2, 1], "int32")
    with pytest.raises(ValueError, match=r"'adapter_state' must be \[index"):
        layer.load_own_variables(store)
    assert layer.adapter_names == ("default",)
    store["adapter_state"] = np.array([1, 1], "int32")
    layer.load_own_variables(store)
    assert layer.adapter_names == ("default", "x")
    assert layer.active_adapter == "x"
    np.testing.assert_array_equal(layer.adapter_variables("x")[1], 1.0)
    assert [v.name for v in layer.trainable_variables] == [
        "lora_a_x",
        "lora_b_x",
    ]
