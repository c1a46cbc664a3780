"""Catalog cases (see catalog.py) for the QLoRA layers: `QLoRADense` and
`QLoRAEinsumDense` (construction, `from_layer` of unsuitable layers).
"""

import keras
import numpy as np

import keras_qlora

from ._apply_support import Settings
from ._apply_support import _call
from ._apply_support import _dense
from ._apply_support import _no

QDense = keras_qlora.QLoRADense
QEinsum = keras_qlora.QLoRAEinsumDense


# -- QLoRADense / QLoRAEinsumDense -------------------------------------------


def _dense_unknown_dim(tmp):
    QDense(8, rank=2).build((None, None))


def _from_layer_nan(tmp):
    dense = _dense()
    dense.kernel.assign(np.full((32, 16), np.nan, "float32"))
    QDense.from_layer(dense, rank=4)


def _from_layer_int8(tmp):
    dense = _dense()
    dense.quantize("int8")
    QDense.from_layer(dense, rank=4)


def _from_layer_keras_lora(tmp):
    dense = _dense()
    dense.enable_lora(2)
    QDense.from_layer(dense, rank=4)


def _einsum_from_non_matmul(tmp):
    layer = keras.layers.EinsumDense("abc,bcd->abd", (6, 48, 16), name="mix")
    layer.build((None, 6, 48))
    QEinsum.from_layer(layer, rank=4)


CASES = [
    # QLoRADense
    _no("QLoRADense", "units zero", _call(QDense, 0, rank=2), ValueError,
        "units must be a positive int", "units=0"),
    _no("QLoRADense", "units a string", _call(QDense, "8", rank=2),
        TypeError, "units must be a positive int", "units='8'"),
    _no("QLoRADense", "settings and layer arguments both",
        _call(QDense, 8, settings=Settings(), rank=4), TypeError, "not both",
        "rank"),
    _no("QLoRADense", "settings a dict", _call(QDense, 8, settings={"r": 4}),
        TypeError, r"pass either settings \(a QLoRASettings\)", "{'r': 4}"),
    _no("QLoRADense", "lora_dropout 1.5",
        _call(QDense, 8, rank=2, lora_dropout=1.5), ValueError, r"\[0, 1\)",
        "lora_dropout=1.5"),
    # Keras' own Layer raises ValueError for any unknown keyword.
    _no("QLoRADense", "unknown keyword", _call(QDense, 8, lora_rank=4),
        ValueError, "Unrecognized keyword arguments", "lora_rank"),
    _no("QLoRADense", "unknown last input dimension", _dense_unknown_dim,
        ValueError, "needs a known last input dimension", "input_shape"),
    _no("QLoRADense", "from_layer of a Conv2D",
        _call(QDense.from_layer, keras.layers.Conv2D(4, 3, name="conv")),
        TypeError, "expects a keras.layers.Dense", "Conv2D", "'conv'"),
    _no("QLoRADense", "from_layer of a string",
        _call(QDense.from_layer, "dense", rank=2), TypeError,
        "expects a keras.layers.Dense", "str"),
    _no("QLoRADense", "from_layer of an unbuilt Dense",
        lambda tmp: QDense.from_layer(_dense(built=False), rank=2),
        ValueError, "is not built", "'dense'"),
    _no("QLoRADense", "from_layer rank above min(K, N)",
        lambda tmp: QDense.from_layer(_dense(units=8), rank=16), ValueError,
        r"rank must be <= min\(K, N\) = 8", "'dense'", "rank=16"),
    _no("QLoRADense", "from_layer unknown keyword",
        lambda tmp: QDense.from_layer(_dense(), ranks=4), TypeError,
        "unknown QLoRA arguments", "ranks", "'dense'"),
    _no("QLoRADense", "from_layer NaN kernel", _from_layer_nan, ValueError,
        "kernel has 512 non-finite", "'dense'"),
    _no("QLoRADense", "from_layer of a Keras int8 layer", _from_layer_int8,
        ValueError, "already quantized by Keras", "'dense'", "int8"),
    _no("QLoRADense", "from_layer of a Keras LoRA layer",
        _from_layer_keras_lora, ValueError, "Keras' own LoRA", "'dense'"),
    # QLoRAEinsumDense
    _no("QLoRAEinsumDense", "equation not one matmul",
        _call(QEinsum, "abc,bcd->abd", (6, 48, 16), rank=2), ValueError,
        "does not reduce to a single matmul", "abc,bcd->abd"),
    _no("QLoRAEinsumDense", "kernel_shape of the wrong rank",
        _call(QEinsum, "abc,cde->abde", (64, 16), rank=2), ValueError,
        "has 3 kernel axes but the kernel has shape", "(64, 16)"),
    _no("QLoRAEinsumDense", "kernel_shape None",
        _call(QEinsum, "abc,cd->abd", None, rank=2), TypeError,
        "must be a tuple of positive ints", "kernel_shape=None"),
    _no("QLoRAEinsumDense", "kernel_shape with a zero",
        _call(QEinsum, "abc,cde->abde", (64, 0, 16), rank=2), ValueError,
        "must hold positive sizes", "kernel_shape=(64, 0, 16)"),
    _no("QLoRAEinsumDense", "equation None",
        _call(QEinsum, None, (64, 16), rank=2), TypeError,
        "equation must be a string", "equation=None"),
    _no("QLoRAEinsumDense", "bias_axes naming an input axis",
        _call(QEinsum, "abc,cd->abd", (64, 16), bias_axes="b", rank=2),
        ValueError, "bias_axes may only name", "bias_axes='b'",
        "abc,cd->abd"),
    _no("QLoRAEinsumDense", "from_layer of a Dense",
        lambda tmp: QEinsum.from_layer(_dense(), rank=2), TypeError,
        "expects a keras.layers.EinsumDense", "Dense 'dense'"),
    _no("QLoRAEinsumDense", "from_layer of a non-matmul EinsumDense",
        _einsum_from_non_matmul, ValueError,
        "does not reduce to a single matmul", "abc,bcd->abd"),
]  # fmt: skip
