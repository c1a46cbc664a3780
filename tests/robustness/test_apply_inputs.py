"""Bad input to `apply()`: a specific error naming the argument, and the
model left as it was (everything is checked before the first layer
changes)."""

import keras
import numpy as np
import pytest

import keras_qlora


def _model():
    return keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(48, name="query"),
            keras.layers.Dense(40, name="value"),
            keras.layers.Dense(8, name="head"),
        ]
    )


def _unchanged(model):
    return all(
        type(layer) in (keras.layers.Dense, keras.layers.EinsumDense)
        for layer in model.layers
    )


CASES = [
    # (apply kwargs, exception, message pattern)
    ({"alpha": float("nan")}, ValueError, r"alpha must be a finite number"),
    ({"alpha": float("inf")}, ValueError, r"alpha must be a finite number"),
    ({"double_quant": "False"}, TypeError, r"double_quant must be True or"),
    ({"scale_search": None}, TypeError, r"scale_search must be True or"),
    ({"use_rslora": "yes"}, TypeError, r"use_rslora must be True or False"),
    ({"rank": 0}, ValueError, r"rank must be a positive int.*rank=0"),
    ({"block_size": 100}, ValueError, r"block_size must be one of"),
    (
        {"modules_to_save": ["typo_head"]},
        ValueError,
        r"modules_to_save \['typo_head'\] matched no layer.*query",
    ),
    (
        {"target_modules": ["query"], "exclude_modules": ["query"]},
        ValueError,
        r"target_modules \['query'\] matched \['query'\], but "
        r"exclude_modules / modules_to_save removed",
    ),
    ({"bias": "some"}, ValueError, r"bias must be one of"),
    ({"offload_optimizer": 1}, TypeError, r"offload_optimizer must be True"),
    ({"colour": "red"}, TypeError, r"apply\(\) got an unexpected keyword"),
]


@pytest.mark.parametrize(
    "kwargs, error, match", CASES, ids=[str(c[0]) for c in CASES]
)
def test_bad_apply_arguments(kwargs, error, match):
    model = _model()
    with pytest.raises(error, match=match):
        keras_qlora.apply(model, verbose=False, **kwargs)
    assert _unchanged(model)


def test_partly_unmatched_modules_to_save_are_reported():
    model = keras_qlora.apply(
        _model(), modules_to_save=["head", "score"], verbose=False
    )
    report = keras_qlora.report.collect(model)
    assert report["unmatched_modules_to_save"] == ["score"]
    text = keras_qlora.summary(model, print_fn=None)
    assert "modules_to_save names that matched nothing: score" in text


def test_bare_dense_names_the_fix():
    dense = keras.layers.Dense(4, name="solo")
    dense.build((None, 8))
    with pytest.raises(
        ValueError, match=r"bare Dense layer 'solo'.*from_layer"
    ):
        keras_qlora.apply(dense, verbose=False)
    assert dense.kernel.dtype == "float32"


def _with_bad_layer(kind):
    inp = keras.Input((6, 32))
    h = keras.layers.Dense(48, name="query")(inp)
    if kind == "small":
        h = keras.layers.Dense(4, name="narrow")(h)  # N=4 < rank 8
    elif kind == "einsum":
        # Contracts two axes, one of them batched: not one matmul.
        h = keras.layers.EinsumDense("abc,bcd->abd", (6, 48, 16), name="mix")(h)
    else:
        h = keras.layers.Dense(16, name="later")(h)
    model = keras.Model(inp, keras.layers.Dense(8, name="value")(h))
    later = model.get_layer("later") if kind in ("nan", "lora") else None
    if kind == "nan":
        kernel = later.kernel.numpy()
        kernel[3, 5] = np.nan
        later.kernel.assign(kernel)
    if kind == "lora":
        later.enable_lora(2)
    return model


@pytest.mark.parametrize(
    "kind, error, match",
    [
        ("small", ValueError, r"'narrow': rank must be <= min\(K, N\) = 4"),
        ("nan", ValueError, r"'later': its kernel has 1 non-finite"),
        ("einsum", ValueError, r"abc,bcd->abd"),
        ("lora", ValueError, r"'later' has Keras' own LoRA enabled"),
    ],
)
def test_apply_is_atomic(kind, error, match):
    # The bad layer comes after good ones: nothing may be converted, and a
    # retry must not say "already applied".
    model = _with_bad_layer(kind)
    kernels = {
        layer.name: layer.kernel.numpy()
        for layer in model.layers
        if hasattr(layer, "kernel")
    }
    with pytest.raises(error, match=match):
        keras_qlora.apply(
            model, rank=8, target_modules="all-linear", verbose=False
        )
    for layer in model.layers:
        assert not isinstance(layer, keras_qlora.layers.QLoRALayerBase)
        if layer.name in kernels:
            np.testing.assert_array_equal(
                layer.kernel.numpy(), kernels[layer.name]
            )
    with pytest.raises(error, match=match):
        keras_qlora.apply(
            model, rank=8, target_modules="all-linear", verbose=False
        )


@pytest.mark.parametrize(
    "device, match",
    [
        ("/GPU:7", r"'/GPU:7' does not exist on this machine"),
        ("/CPU:3", r"'/CPU:3' does not exist"),
        ("not a device", r"is not a TF device string"),
    ],
)
def test_offload_to_a_missing_device_is_refused(device, match):
    from keras_qlora.training import HostOffloadOptimizer

    with pytest.raises(ValueError, match=match):
        HostOffloadOptimizer(keras.optimizers.Adam(), host_device=device)
    HostOffloadOptimizer(keras.optimizers.Adam(), host_device="/CPU:0")


def test_regularizers_kept_or_dropped_with_a_warning(tmp_path):
    def float_model():
        return keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(
                    6,
                    name="query",
                    activity_regularizer="l2",
                    bias_regularizer="l1",
                    kernel_regularizer="l2",
                    kernel_constraint="non_neg",
                ),
                keras.layers.EinsumDense(
                    "ab,bc->ac",
                    (6, 4),
                    bias_axes="c",
                    name="value",
                    activity_regularizer="l1",
                ),
            ]
        )

    x = np.ones((2, 8), "float32")
    with pytest.warns(
        UserWarning,
        match=r"drops .* of 1 layer\(s\).*query: kernel_regularizer, "
        r"kernel_constraint",
    ):
        q = keras_qlora.apply(
            float_model(),
            rank=2,
            target_modules=["query", "value"],
            bias="all",
            verbose=False,
        )
    q(x)
    # Two activity regularizers and the (now trainable) bias regularizer.
    assert len(q.losses) == 3
    path = str(tmp_path / "m.keras")
    q.save(path)
    loaded = keras.saving.load_model(path)
    query = loaded.qlora_layers()["query"]
    assert query.activity_regularizer is not None
    assert query.bias_regularizer is not None


def test_the_checks_before_converting_draw_no_random_numbers():
    """apply() checks every layer before converting the first; those checks
    must not consume the seeded random stream (a Dropout's seed generator
    draws from it), or a seeded apply() initializes adapters differently
    from the same apply() without the checks."""
    import random

    from keras_qlora.layers import QLoRADense
    from keras_qlora.settings import QLoRASettings

    model = _model()
    settings = QLoRASettings(rank=4, dropout=0.1)
    state = random.getstate()
    for layer in model.layers:
        QLoRADense.check_source(layer, settings)
    assert random.getstate() == state
    # The converted layer itself does draw (its dropout has a seed).
    QLoRADense.from_layer(model.layers[0], settings)
    assert random.getstate() != state
