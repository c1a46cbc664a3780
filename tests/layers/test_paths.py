"""`adopt_parent_path`: a replacement layer's variables where the old
layer's live."""

import keras

from keras_qlora.layers import QLoRADense
from keras_qlora import internals
from keras_qlora.layers.paths import adopt_parent_path
from keras_qlora.layers.paths import parent_path


def _dense_in(scope, name="query"):
    layer = keras.layers.Dense(4, name=name)
    with keras.name_scope(scope):
        with keras.name_scope("attention"):
            layer.build((None, 8))
    return layer


def test_parent_path_from_the_kernel():
    layer = _dense_in("block_0")
    assert layer.kernel.path == "block_0/attention/query/kernel"
    assert parent_path(layer) == "block_0/attention"
    top = keras.layers.Dense(4, name="head")
    top.build((None, 8))
    assert parent_path(top) == ""


def test_parent_path_without_variables_is_keras_record_or_none():
    assert parent_path(keras.layers.Dense(4)) is None
    layer = keras.layers.Dropout(0.1, name="drop")
    internals.set_parent_path(layer, "block_0")
    assert parent_path(layer) == "block_0"


def test_from_layer_and_later_variables_use_the_path():
    new = QLoRADense.from_layer(_dense_in("block_1"), rank=2)
    assert sorted(v.path for v in new.weights) == [
        f"block_1/attention/query/{name}"
        for name in ("bias", "lora_a", "lora_b", "nf4_absmax",
                     "nf4_absmax_offset", "nf4_absmax_scale", "nf4_packed")
    ]  # fmt: skip
    new.add_adapter("other")
    assert new.lora_a_other.path == "block_1/attention/query/lora_a_other"


def test_adopt_keeps_the_new_layers_own_scope_when_unknown():
    new = keras.layers.Dense(4, name="query")
    adopt_parent_path(new, keras.layers.Dense(4, name="query"))
    new.build((None, 8))
    assert new.kernel.path == "query/kernel"
