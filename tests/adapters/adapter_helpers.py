"""Small QLoRA models with deterministic weights, shared by adapter tests."""

import keras
import numpy as np

import keras_qlora
from keras_qlora import adapters


def float_model(seed=0, head=True):
    """query (LoRA) -> mlp (NF4 only) -> value (LoRA) [-> head (float)]."""
    layers = [
        keras.Input((24,)),
        keras.layers.Dense(32, activation="gelu", name="query"),
        keras.layers.Dense(32, activation="gelu", name="mlp"),
        keras.layers.Dense(16, name="value"),
    ]
    if head:
        layers.append(keras.layers.Dense(3, name="head"))
    model = keras.Sequential(layers)
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.standard_normal(variable.shape) * 0.3)
    return model


def qlora(seed=0, head=True, **kwargs):
    kwargs.setdefault("rank", 4)
    saved = ["head"] if head else None
    return keras_qlora.apply(
        float_model(seed, head), modules_to_save=saved, verbose=False, **kwargs
    )


def randomize(model, seed, name=None):
    """Gives adapter `name` (default: the active one) and the head random
    values; returns them as {variable path: value}."""
    name = adapters.active_adapter(model) if name is None else name
    rng = np.random.default_rng(seed)
    values = {}
    for layer in model.qlora_layers(lora_only=True).values():
        for variable in layer.adapter_variables(name):
            values[variable.path] = rng.standard_normal(variable.shape) * 0.2
            variable.assign(values[variable.path])
    for variable in model.weights:
        if "head" in variable.path:
            values[variable.path] = rng.standard_normal(variable.shape)
            variable.assign(values[variable.path])
    return values


def inputs(n=6, seed=7):
    return (
        np.random.default_rng(seed).standard_normal((n, 24)).astype("float32")
    )


def snapshot(model):
    return {v.path: v.numpy().copy() for v in model.weights}


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
