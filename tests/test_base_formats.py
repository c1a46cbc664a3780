"""Every base format (NF4, FP4, int8) through the whole product: apply(),
fit, summary, `.keras`, adapters, merge / unmerge, SavedModels (fused and
portable, loaded in a fresh process) and bitsandbytes interop of a model.

NF4 has its own, deeper tests everywhere else; these check that FP4 and
int8 take every path NF4 takes, with each format's own numbers.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest

import keras_qlora
from keras_qlora.quantizers import dequantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ["fp4", "int8"]
BITS = {"nf4": (4.0, 4.6), "fp4": (4.0, 4.6), "int8": (8.0, 8.6)}


def _float_model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((64,), name="features")
    h = keras.layers.Dense(96, activation="relu", name="query")(inp)
    out = keras.layers.Dense(8, name="value")(h)
    return keras.Model(inp, out)


def _data(n=256):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 64)).astype("float32")
    y = rng.standard_normal((n, 8)).astype("float32")
    return x, y


def _applied(quant_type, seed=0):
    return keras_qlora.apply(
        _float_model(seed),
        rank=4,
        target_modules=("query", "value"),
        quant_type=quant_type,
        verbose=False,
    )


def _randomize_lora(q, seed):
    rng = np.random.default_rng(seed)
    for layer in q.qlora_layers(lora_only=True).values():
        value = rng.standard_normal(layer.lora_b.shape).astype("float32")
        layer.lora_b.assign(0.05 * value)


@pytest.mark.parametrize("quant_type", FORMATS)
def test_layers_compute_with_their_format(quant_type):
    float_model = _float_model()
    kernels = {
        name: float_model.get_layer(name).kernel.numpy()
        for name in ("query", "value")
    }
    q = keras_qlora.apply(
        float_model,
        rank=4,
        target_modules=("query", "value"),
        quant_type=quant_type,
        verbose=False,
    )
    x, _ = _data(16)
    h = x
    for name, layer in q.qlora_layers().items():
        assert layer.quant_type == quant_type, name
        state = layer.nf4_state()
        assert state.quant_type == quant_type
        w = dequantize(state)
        # The stored weight is the format's quantization of the float one.
        want = dequantize(
            keras_qlora.quantizers.quantize(
                kernels[name.split("/")[-1]], quant_type
            )
        )
        np.testing.assert_array_equal(w, want)
        h = h @ w + layer.bias.numpy()
        if name.endswith("query"):
            h = np.maximum(h, 0)
    np.testing.assert_allclose(np.asarray(q(x)), h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant_type", ["nf4"] + FORMATS)
def test_summary_names_the_format_and_its_bits(quant_type):
    q = _applied(quant_type)
    info = keras_qlora.report.collect(q)
    assert info["formats"] == quant_type.upper()
    low, high = BITS[quant_type]
    for item in info["layers"]:
        assert item["quant_type"] == quant_type
        assert low < item["bits_per_weight"] < high
    text = keras_qlora.summary(q, print_fn=None)
    assert f"Replaced layers: 2 {quant_type.upper()} (2 with LoRA)" in text
    assert f"{quant_type.upper()} layers at" in text


@pytest.mark.parametrize("quant_type", FORMATS)
def test_fit_trains_only_lora_and_round_trips_keras(quant_type, tmp_path):
    q = _applied(quant_type)
    frozen = {
        path: layer.nf4_state().packed.copy()
        for path, layer in q.qlora_layers().items()
    }
    q.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x, y = _data()
    history = q.fit(x, y, epochs=4, batch_size=32, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.95 * losses[0], losses
    for path, layer in q.qlora_layers().items():
        np.testing.assert_array_equal(layer.nf4_state().packed, frozen[path])
        assert np.abs(layer.lora_b.numpy()).max() > 0
    path = tmp_path / "model.keras"
    q.save(path)
    loaded = keras.models.load_model(path)
    for layer in loaded.qlora_layers().values():
        assert layer.quant_type == quant_type
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(q(x)))


@pytest.mark.parametrize("quant_type", FORMATS)
def test_adapter_file_moves_between_models_of_the_format(quant_type, tmp_path):
    a = _applied(quant_type)
    _randomize_lora(a, 3)
    keras_qlora.save_adapter(a, tmp_path / "adapter")
    b = _applied(quant_type)
    keras_qlora.load_adapter(b, tmp_path / "adapter")
    x, _ = _data(8)
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))
    # The fingerprint knows the format: an NF4 base is a different model.
    other = _applied("nf4")
    with pytest.raises(ValueError, match="trained on a different base model"):
        keras_qlora.load_adapter(other, tmp_path / "adapter")


@pytest.mark.parametrize("quant_type", FORMATS)
def test_float_merge_equals_the_adapted_model(quant_type):
    q = _applied(quant_type)
    _randomize_lora(q, 4)
    x, _ = _data(8)
    want = np.asarray(q(x))
    merged = keras_qlora.merge(q)
    np.testing.assert_allclose(
        np.asarray(merged(x)), want, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("quant_type", FORMATS)
def test_requantize_merge_then_unmerge_restores_the_bytes(quant_type):
    q = _applied(quant_type)
    _randomize_lora(q, 5)
    before = {p: x.nf4_state() for p, x in q.qlora_layers().items()}
    x, _ = _data(8)
    want = np.asarray(q(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras_qlora.merge(q, requantize=True)
    assert any("lossy" in str(w.message) for w in caught)
    for path, layer in q.qlora_layers().items():
        assert layer.nf4_state().quant_type == quant_type
        assert not np.array_equal(layer.nf4_state().packed, before[path].packed)
    # The requantized weights approximate the merge within the format.
    tol = 0.02 if quant_type == "int8" else 0.3
    got = np.asarray(q(x))
    assert np.abs(got - want).max() < tol * np.abs(want).max()
    keras_qlora.unmerge(q)
    for path, layer in q.qlora_layers().items():
        state = layer.nf4_state()
        np.testing.assert_array_equal(state.packed, before[path].packed)
        np.testing.assert_array_equal(state.absmax, before[path].absmax)
    np.testing.assert_array_equal(np.asarray(q(x)), want)


@pytest.mark.parametrize("quant_type", FORMATS)
def test_bitsandbytes_model_round_trip(quant_type):
    q = _applied(quant_type)
    sd = keras_qlora.interop.to_bitsandbytes_model(q)
    weight = sd["query.weight"]
    if quant_type == "int8":
        assert weight.dtype == np.int8 and weight.shape == (96, 64)
        assert sd["query.SCB"].shape == (96,)
    else:
        assert "query.weight.quant_state.bitsandbytes__fp4" in sd
    other = _applied(quant_type, seed=9)
    keras_qlora.interop.from_bitsandbytes_model(other, sd)
    x, _ = _data(8)
    np.testing.assert_array_equal(np.asarray(other(x)), np.asarray(q(x)))
    nf4 = _applied("nf4")
    with pytest.raises(
        ValueError,
        match=f"holds a {quant_type} weight.*quant_type='{quant_type}'",
    ):
        keras_qlora.interop.from_bitsandbytes_model(nf4, sd)


LOAD_BOTH = """
    import json
    import numpy as np
    import tensorflow as tf
    import keras_qlora

    out = {}
    x = np.load("x.npy")
    for quant_type in ("fp4", "int8"):
        portable = tf.saved_model.load(f"{quant_type}_portable")
        fused = keras_qlora.load_saved_model(f"{quant_type}_fused")
        want = np.load(f"{quant_type}_ref.npy")
        out[quant_type] = [
            float(np.abs(portable.serve(x).numpy() - want).max()),
            float(np.abs(fused.serve(x).numpy() - want).max()),
        ]
    print(json.dumps(out))
"""


def test_savedmodels_of_each_format_load_in_a_fresh_process(tmp_path):
    x, _ = _data(4)
    np.save(tmp_path / "x.npy", x)
    for quant_type in FORMATS:
        q = _applied(quant_type)
        _randomize_lora(q, 6)
        keras_qlora.export(q, tmp_path / f"{quant_type}_fused")
        np.save(tmp_path / f"{quant_type}_ref.npy", np.asarray(q(x)))
        keras_qlora.export(
            q, tmp_path / f"{quant_type}_portable", portable=True
        )
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOAD_BOTH)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = json.loads(result.stdout.strip().splitlines()[-1])
    for quant_type in FORMATS:
        assert max(diffs[quant_type]) < 1e-4, diffs


@pytest.mark.parametrize(
    "value, error",
    [
        ("int4", ValueError),
        ("INT8", ValueError),
        (8, TypeError),
        (None, TypeError),
    ],
)
def test_apply_refuses_unknown_formats(value, error):
    model = _float_model()
    with pytest.raises(
        error,
        match=r"quant_type must be one of \('nf4', "
        r"'fp4', 'int8'\)\. Received: quant_type=",
    ):
        keras_qlora.apply(model, quant_type=value, verbose=False)
    # Refused before anything changed.
    assert isinstance(model.get_layer("query"), keras.layers.Dense)


def test_a_layer_refuses_a_state_of_another_format():
    q = _applied("nf4")
    layer = q.qlora_layers()["query"]
    kernel = np.ones(layer.kernel_2d_shape, "float32")
    for quant_type in FORMATS:
        state = keras_qlora.quantizers.quantize(kernel, quant_type)
        with pytest.raises(ValueError, match=f"'{quant_type}'"):
            layer.set_nf4_state(state)
