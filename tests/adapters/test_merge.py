"""merge / unmerge: float merge into stock Keras layers (saved and loaded
without keras_qlora), requantize merge, exact unmerge, safe mode."""

import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile

import keras
import keras_hub
import numpy as np
import pytest
from adapter_helpers import assert_unchanged
from adapter_helpers import float_model
from adapter_helpers import inputs
from adapter_helpers import qlora
from adapter_helpers import randomize
from adapter_helpers import snapshot

import keras_qlora
from keras_qlora import adapters
from keras_qlora import surgery
from keras_qlora.adapters.merge import merge
from keras_qlora.adapters.merge import unmerge
from keras_qlora.layers import QLoRAEinsumDense
from keras_qlora.layers import QLoRALayerBase
from keras_qlora.quantizers import dequantize_nf4
from keras_qlora.quantizers import quantize_nf4
from keras_qlora.training import checkpointed_layers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
EINSUM_TARGETS = ["query", "attention_output", "value", "proj"]


def einsum_qlora(seed=0):
    """EinsumDense layers with leading, middle and `...` contractions, with
    and without bias, plus a Dense without LoRA ("mlp")."""
    dense = keras.layers.EinsumDense
    x = keras.Input((5, 16))
    h = dense("abc,cde->abde", (None, 2, 8), bias_axes="de", name="query")(x)
    h = dense(
        "abde,dec->abc", (None, 16), bias_axes="c", name="attention_output"
    )(h)
    h = keras.layers.Dense(24, activation="gelu", name="mlp")(h)
    h = dense("btd,ndh->btnh", (None, 3, 4), name="value")(h)
    h = dense("...h,hk->...k", (6,), "tanh", bias_axes="k", name="proj")(h)
    model = keras.Model(x, h)
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.standard_normal(variable.shape) * 0.3)
    q = keras_qlora.apply(
        model, rank=4, target_modules=EINSUM_TARGETS, verbose=False
    )
    randomize(q, seed + 1)
    return q


def einsum_inputs(seed=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, 5, 16)).astype("float32")


def dense_qlora(seed=0):
    q = qlora(seed)
    randomize(q, seed + 1)
    return q


def lora_effect(q, x):
    """max |output with adapters - output of the NF4 base alone|."""
    with_lora = keras.tree.map_structure(np.asarray, q(x))
    adapters.disable_adapters(q)
    base = keras.tree.map_structure(np.asarray, q(x))
    adapters.enable_adapters(q)
    diffs = keras.tree.map_structure(
        lambda a, b: np.abs(a - b).max(), with_lora, base
    )
    return max(keras.tree.flatten(diffs))


def expected_kernels(q, adapter="default"):
    """{path: dequant(W) + scale * A @ B} ([K, N], float32), computed from
    the QLoRA layers before merging."""
    out = {}
    for path, layer in q.qlora_layers().items():
        kernel = dequantize_nf4(layer.nf4_state())
        if layer.has_lora:
            a, b = (v.numpy() for v in layer.adapter_variables(adapter))
            kernel = kernel + np.float32(layer.lora_scale) * (a @ b)
        out[path] = (type(layer), layer.get_config(), kernel)
    return out


def assert_close(got, want):
    flat_got, flat_want = keras.tree.flatten(got), keras.tree.flatten(want)
    assert len(flat_got) == len(flat_want)
    for g, w in zip(flat_got, flat_want, strict=True):
        w = np.asarray(w)
        atol = 1e-5 * max(1.0, np.abs(w).max())
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=atol)


def assert_merged_layers(plain, expected):
    """Stock layers with the QLoRA layers' config and merged kernels."""
    by_path = {e.path: e.layer for e in surgery.walk(plain)}
    assert not any(isinstance(v, QLoRALayerBase) for v in by_path.values())
    for path, (cls, config, kernel_2d) in expected.items():
        layer = by_path[path]
        stock = (
            keras.layers.EinsumDense
            if cls is QLoRAEinsumDense
            else keras.layers.Dense
        )
        assert type(layer) is stock, path
        got = layer.get_config()
        keys = ["name", "activation", "dtype"]
        keys += (
            ["equation", "bias_axes"]
            if stock is keras.layers.EinsumDense
            else ["units", "use_bias"]
        )
        for key in keys:
            assert got[key] == config[key], (path, key)
        kernel = layer.kernel.numpy()
        if stock is keras.layers.EinsumDense:
            plan = QLoRAEinsumDense(
                config["equation"], config["kernel_shape"]
            ).plan
            kernel = np.asarray(plan.kernel_to_2d(kernel))
        np.testing.assert_array_equal(kernel, kernel_2d, err_msg=path)
        assert not layer.kernel.trainable


@pytest.mark.parametrize(
    "build, x",
    [(dense_qlora, inputs()), (einsum_qlora, einsum_inputs())],
    ids=["dense", "einsum"],
)
def test_float_merge_gives_stock_layers_with_the_same_outputs(build, x):
    q = build()
    assert lora_effect(q, x) > 0.1  # the adapter matters
    expected = expected_kernels(q)
    # A layer without LoRA ("mlp") is merged too: dequantized only.
    assert expected["mlp"][1]["rank"] is None
    want = q(x)
    base = q.base_model
    heads = {v.path: v.numpy() for v in base.weights if "head" in v.path}
    plain = merge(q)
    assert plain is base and not isinstance(plain, keras_qlora.QLoRAModel)
    assert_merged_layers(plain, expected)
    assert_close(plain(x), want)
    for path, value in heads.items():  # modules_to_save keep their values
        weight = next(v for v in plain.weights if v.path == path)
        np.testing.assert_array_equal(weight.numpy(), value)


def test_a_float_merged_qlora_model_refuses_any_later_use(tmp_path):
    q, x = dense_qlora(), inputs()
    plain = merge(q)
    retired = f"merged into the plain model '{plain.name}'"
    with pytest.raises(RuntimeError, match=retired):
        q(x)
    with pytest.raises(RuntimeError, match=retired):
        q.predict(x, verbose=0)
    with pytest.raises(RuntimeError, match=retired):
        keras_qlora.save_adapter(q, str(tmp_path / "adapter"))
    with pytest.raises(RuntimeError, match=retired):
        q.save(str(tmp_path / "q.keras"))
    with pytest.raises(ValueError, match="neither merged again nor unmerged"):
        merge(q)
    with pytest.raises(ValueError, match="neither merged again nor unmerged"):
        unmerge(q)
    with pytest.raises(TypeError, match="Received: Sequential"):
        unmerge(plain)


@pytest.fixture(scope="module")
def bert():
    """A tiny BertBackbone with LoRA on every linear layer (and gradient
    checkpointing), its QLoRA outputs, and the merged plain model."""
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    q = keras_qlora.apply(
        backbone,
        rank=4,
        target_modules="all-linear",
        gradient_checkpointing=True,
        verbose=False,
    )
    randomize(q, 5)
    x = {
        "token_ids": np.arange(12).reshape(2, 6) % 50,
        "segment_ids": np.zeros((2, 6), "int32"),
        "padding_mask": np.ones((2, 6), "int32"),
    }
    effect = lora_effect(q, x)
    expected = expected_kernels(q)
    want = {k: np.asarray(v) for k, v in q(x).items()}
    plain = merge(q)
    return x, effect, expected, want, plain


def test_float_merge_of_a_keras_hub_backbone(bert):
    x, effect, expected, want, plain = bert
    assert effect > 0.1
    # 2 x (q, k, v, attention output, 2 FFN) + pooled_dense.
    assert len(expected) == 13
    assert all(cfg["rank"] == 4 for _, cfg, _ in expected.values())
    assert isinstance(plain, keras_hub.models.BertBackbone)
    assert checkpointed_layers(plain) == []
    assert_merged_layers(plain, expected)
    assert_close(plain(x), want)


LOAD_WITHOUT_KERAS_QLORA = """
    import sys
    sys.modules["keras_qlora"] = None  # any import of it fails
    import keras, keras_hub, numpy as np, tensorflow as tf
    d = {d!r}
    bert = keras.saving.load_model(d + "/bert.keras")
    x = dict(np.load(d + "/bert_x.npz"))
    np.savez(d + "/bert_out.npz", **{{k: np.asarray(v) for k, v in
                                     bert(x).items()}})
    einsum = keras.saving.load_model(d + "/einsum.keras")
    x = np.load(d + "/einsum_x.npy")
    np.save(d + "/einsum_out.npy", np.asarray(einsum(x)))
    served = tf.saved_model.load(d + "/einsum_export")
    np.save(d + "/export_out.npy", served.serve(x).numpy())
    print("loaded:", "keras_qlora" in sys.modules and sys.modules[
        "keras_qlora"] is not None)
"""


def test_merged_models_save_export_and_load_without_keras_qlora(bert, tmp_path):
    x_bert, _, _, want_bert, plain_bert = bert
    q, x = einsum_qlora(), einsum_inputs()
    want = np.asarray(q(x))
    plain = merge(q)
    plain_bert.save(tmp_path / "bert.keras")
    plain.save(tmp_path / "einsum.keras")
    plain.export(str(tmp_path / "einsum_export"), verbose=False)
    for name in ("bert.keras", "einsum.keras"):
        with zipfile.ZipFile(tmp_path / name) as archive:
            config = archive.read("config.json").decode()
        json.loads(config)
        assert "keras_qlora" not in config and "QLoRA" not in config
    np.savez(tmp_path / "bert_x.npz", **x_bert)
    np.save(tmp_path / "einsum_x.npy", x)
    code = textwrap.dedent(LOAD_WITHOUT_KERAS_QLORA.format(d=str(tmp_path)))
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded: False" in result.stdout
    got_bert = dict(np.load(tmp_path / "bert_out.npz"))
    assert got_bert.keys() == want_bert.keys()
    assert_close(got_bert, want_bert)
    assert_close(np.load(tmp_path / "einsum_out.npy"), want)
    assert_close(np.load(tmp_path / "export_out.npy"), want)


def test_a_named_non_default_adapter_merges_with_its_own_head():
    q, x = dense_qlora(seed=0), inputs()
    adapters.add_adapter(q, "task_b")
    adapters.set_adapter(q, "task_b")
    randomize(q, 9)  # task_b's LoRA values and head
    want_b = q(x).numpy()
    expected = expected_kernels(q, "task_b")
    adapters.set_adapter(q, "default")
    assert np.abs(q(x).numpy() - want_b).max() > 0.1
    plain = merge(q, adapter="task_b")
    assert_merged_layers(plain, expected)
    assert_close(plain(x), want_b)


def test_a_model_without_lora_dequantizes():
    model = keras_qlora.apply(float_model(), target_modules=None, verbose=False)
    x = inputs()
    want = model(x).numpy()
    expected = expected_kernels(model)
    assert len(expected) == 4
    with pytest.raises(ValueError, match="no LoRA layers, so there is"):
        merge(model, requantize=True)
    with pytest.raises(ValueError, match="no LoRA adapters. Received"):
        merge(model, adapter="default")
    plain = merge(model)
    assert_merged_layers(plain, expected)
    assert_close(plain(x), want)


# -- requantize merge and unmerge --------------------------------------------

_WARNING = (
    r"folded adapter 'default' into the NF4 weights of 2 layers, which is "
    r"lossy\. Relative Frobenius error of the requantized weights vs the "
    r"exact float merge: mean (\S+), worst (\S+) \(layer '(\w+)'\)\. "
    r"keras_qlora\.unmerge\(model\) restores"
)


def test_requantize_merge_folds_the_adapter_and_reports_its_error():
    x = inputs()
    float_out = merge(dense_qlora())(x).numpy()
    q = dense_qlora()
    base_error = lora_effect(q, x)
    before = snapshot(q)
    exact = {p: k for p, (_, _, k) in expected_kernels(q).items()}
    with pytest.warns(UserWarning, match=_WARNING) as record:
        assert merge(q, requantize=True) is q
    message = next(str(w.message) for w in record if "folded" in str(w.message))
    mean, worst, worst_path = re.search(_WARNING, message).groups()

    layers = q.qlora_layers()
    errors = {}
    for path in ("query", "value"):
        layer = layers[path]
        state = layer.nf4_state()
        # The new NF4 state is the NF4 quantization of the exact merge.
        again = quantize_nf4(exact[path], 64, True, True)
        np.testing.assert_array_equal(state.packed, again.packed)
        np.testing.assert_array_equal(state.absmax, again.absmax)
        diff = dequantize_nf4(state).astype("float64") - exact[path]
        errors[path] = np.linalg.norm(diff) / np.linalg.norm(exact[path])
        assert not layer.lora_b.numpy().any()  # the adapter adds nothing
        np.testing.assert_array_equal(
            layer.lora_a.numpy(), before[layer.lora_a.path]
        )
    assert worst_path == max(errors, key=errors.get)
    np.testing.assert_allclose(float(worst), max(errors.values()), rtol=1e-2)
    np.testing.assert_allclose(
        float(mean), np.mean(list(errors.values())), rtol=1e-2
    )
    assert 0.01 < float(worst) < 0.2  # NF4-sized, not zero, not garbage
    # Untouched: the layer without LoRA and the head.
    for path, value in before.items():
        if path.startswith(("mlp/", "head/")):
            np.testing.assert_array_equal(
                next(v for v in q.weights if v.path == path).numpy(), value
            )
    out = q(x).numpy()
    error = np.abs(out - float_out).max()
    assert error < 0.2 * np.abs(float_out).max()
    assert error < base_error  # much closer than dropping the adapter


def test_unmerge_restores_the_exact_bytes_and_lora_values(tmp_path):
    q, x = dense_qlora(), inputs()
    want = q(x).numpy()
    before = snapshot(q)
    with pytest.warns(UserWarning, match="lossy"):
        merge(q, requantize=True)
    assert np.abs(q(x).numpy() - want).max() > 1e-3
    for kwargs in ({}, {"requantize": True}):
        with pytest.raises(ValueError, match="already holds adapter 'default'"):
            merge(q, **kwargs)
    merged = [v.numpy() for v in q.weights]
    q.save(tmp_path / "merged.keras")
    assert unmerge(q) is q
    assert_unchanged(q, before)
    np.testing.assert_array_equal(q(x).numpy(), want)
    with pytest.raises(ValueError, match="has nothing to undo"):
        unmerge(q)
    # The bookkeeping is not saved: a loaded model has nothing to undo.
    loaded = keras.saving.load_model(tmp_path / "merged.keras")
    assert len(loaded.weights) == len(merged)
    for variable, value in zip(loaded.weights, merged, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)
    with pytest.raises(ValueError, match="loaded from a file cannot be"):
        unmerge(loaded)


def test_unmerge_refuses_after_changes_unless_forced():
    q = dense_qlora()
    before = snapshot(q)
    with pytest.warns(UserWarning, match="lossy"):
        merge(q, requantize=True)
    layer = q.qlora_layers()["value"]
    layer.lora_b.assign(np.ones(layer.lora_b.shape, "float32"))  # "trained"
    changed = snapshot(q)
    with pytest.raises(ValueError, match="layer 'value' changed since merge"):
        unmerge(q)
    assert_unchanged(q, changed)
    unmerge(q, force=True)
    assert_unchanged(q, before)


# -- safe mode and bad input -------------------------------------------------


@pytest.mark.parametrize("requantize", [False, True])
def test_safe_mode_refuses_non_finite_results_and_changes_nothing(requantize):
    q, x = dense_qlora(), inputs()
    layer = q.qlora_layers()["value"]
    lora_b = layer.lora_b.numpy()
    lora_b[1, 2] = np.inf
    layer.lora_b.assign(lora_b)
    before = snapshot(q)
    with pytest.raises(
        ValueError,
        match=r"merged kernel of layer 'value' has \d+ non-finite values "
        r"\(NaN or Inf\) with adapter 'default'\. Nothing was changed",
    ):
        merge(q, requantize=requantize)
    assert_unchanged(q, before)
    assert all(
        isinstance(e.layer, QLoRALayerBase)
        for e in surgery.walk(q.base_model)
        if e.layer.name in ("query", "mlp", "value")
    )
    assert q(x).shape == (6, 3)  # still a working QLoRA model


def test_unsafe_float_merge_skips_the_check():
    q = dense_qlora()
    layer = q.qlora_layers()["value"]
    lora_b = layer.lora_b.numpy()
    lora_b[1, 2] = np.inf
    layer.lora_b.assign(lora_b)
    plain = merge(q, safe=False)
    assert not np.isfinite(plain.get_layer("value").kernel.numpy()).all()
    assert np.isfinite(plain.get_layer("query").kernel.numpy()).all()


def test_bad_input_is_refused_clearly():
    q = dense_qlora()
    before = snapshot(q)
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    cases = [
        (
            TypeError,
            r"expects the model returned by keras_qlora\.apply\(\)\. "
            "Received: Sequential",
            lambda: merge(plain),
        ),
        (TypeError, "Received: Sequential", lambda: unmerge(plain)),
        (
            ValueError,
            r"no adapter named 'nope'\. Its adapters: \['default'\]",
            lambda: merge(q, adapter="nope"),
        ),
        (
            TypeError,
            "adapter name must be a string",
            lambda: merge(q, adapter=3),
        ),
        (
            TypeError,
            "safe must be True or False. Received: safe='yes'",
            lambda: merge(q, safe="yes"),
        ),
        (
            TypeError,
            "requantize must be True or False",
            lambda: merge(q, requantize=1),
        ),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()
    adapters.disable_adapters(q)
    with pytest.raises(ValueError, match="adapters are disabled"):
        merge(q)
    assert_unchanged(q, before)
