"""Catalog cases (see catalog.py): the optimizers of `keras_qlora.training`.

`HostOffloadOptimizer`, `AdamW8bit` (hyperparameters and state) and its
blockwise quantizer, `quantize_blockwise_8bit` /
`dequantize_blockwise_8bit`.

Models are a Sequential of two small Dense layers (8 -> 16 -> 4) with LoRA
on "q".
"""

import keras
import numpy as np
import tensorflow as tf

from keras_qlora import training
from keras_qlora.quantizers import codes
from keras_qlora.training import AdamW8bit
from keras_qlora.training import HostOffloadOptimizer

from .catalog import Case
from .catalog import Correct
from .catalog import Refused

# -- HostOffloadOptimizer ---------------------------------------------------


def _offload_by_name(tmp):
    opt = HostOffloadOptimizer("adamw")
    assert type(opt.inner_optimizer).__name__ == "AdamW"
    assert opt.host_device == "/CPU:0"


def _offload_other_variables(tmp):
    a = keras.Variable(np.ones((3,), "float32"), name="a")
    b = keras.Variable(np.ones((3,), "float32"), name="b")
    opt = HostOffloadOptimizer(keras.optimizers.SGD(0.1))
    opt.build([a])
    opt.apply([tf.ones(3)], [b])


def _offload_under_strategy(tmp):
    opt = HostOffloadOptimizer(keras.optimizers.SGD(0.1))
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        opt.build([keras.Variable(np.ones((3,), "float32"))])


_INNER = "inner_optimizer"
CASES = [
    Case(
        "HostOffloadOptimizer",
        "inner optimizer a number",
        lambda tmp: HostOffloadOptimizer(42),
        Refused(TypeError, r"must be a Keras optimizer", names=(_INNER, "42")),
    ),
    Case(
        "HostOffloadOptimizer",
        "inner optimizer an unknown name",
        lambda tmp: HostOffloadOptimizer("adamm"),
        Refused(ValueError, r"not an optimizer", names=(_INNER, "'adamm'")),
    ),
    Case(
        "HostOffloadOptimizer",
        "inner optimizer a layer",
        lambda tmp: HostOffloadOptimizer(keras.layers.Dense(2)),
        Refused(TypeError, r"must be a Keras optimizer", names=(_INNER,)),
    ),
    Case(
        "HostOffloadOptimizer",
        "inner optimizer a config without class_name",
        lambda tmp: HostOffloadOptimizer({"learning_rate": 0.1}),
        Refused(ValueError, r"not an optimizer", names=(_INNER,)),
    ),
    Case(
        "HostOffloadOptimizer",
        "inner optimizer missing (None)",
        lambda tmp: HostOffloadOptimizer(None),
        Refused(TypeError, r"needs a Keras optimizer", names=("NoneType",)),
    ),
    Case(
        "HostOffloadOptimizer",
        "inner optimizer a LossScaleOptimizer",
        lambda tmp: HostOffloadOptimizer(
            keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())
        ),
        Refused(TypeError, r"does not support", names=("LossScaleOptimizer",)),
    ),
    Case(
        "HostOffloadOptimizer",
        "wrapping twice",
        lambda tmp: HostOffloadOptimizer(HostOffloadOptimizer("adam")),
        Refused(TypeError, r"already a HostOffloadOptimizer", names=("Adam",)),
    ),
    Case(
        "HostOffloadOptimizer",
        "inner optimizer by name",
        _offload_by_name,
        Correct(),
    ),
    Case(
        "HostOffloadOptimizer",
        "host_device None",
        lambda tmp: HostOffloadOptimizer("adam", host_device=None),
        Refused(TypeError, r"device string", names=("host_device=None",)),
    ),
    Case(
        "HostOffloadOptimizer",
        "host_device empty",
        lambda tmp: HostOffloadOptimizer("adam", host_device=""),
        Refused(ValueError, r"must name a device", names=("host_device=''",)),
    ),
    Case(
        "HostOffloadOptimizer",
        "host_device malformed",
        lambda tmp: HostOffloadOptimizer("adam", host_device="banana"),
        Refused(ValueError, r"not a TF device string", names=("'banana'",)),
    ),
    Case(
        "HostOffloadOptimizer",
        "host_device absent from the machine",
        lambda tmp: HostOffloadOptimizer("adam", host_device="/GPU:64"),
        Refused(ValueError, r"does not exist", names=("'/GPU:64'",)),
    ),
    Case(
        "HostOffloadOptimizer",
        "host_device bytes",
        lambda tmp: HostOffloadOptimizer("adam", host_device=b"/CPU:0"),
        Refused(TypeError, r"device string", names=("host_device=b'/CPU:0'",)),
    ),
    Case(
        "HostOffloadOptimizer",
        "apply to variables it was not built for",
        _offload_other_variables,
        Refused(ValueError, r"recompile", names=("new", "b")),
    ),
    Case(
        "HostOffloadOptimizer",
        "built under a tf.distribute strategy",
        _offload_under_strategy,
        Refused(ValueError, r"not supported under", names=("OneDevice",)),
    ),
]

# -- AdamW8bit --------------------------------------------------------------


def _zero_learning_rate(tmp):
    variable = keras.Variable(np.ones((8,), "float32"))
    opt = AdamW8bit(learning_rate=0.0, min_8bit_size=0)
    opt.build([variable])
    opt.apply([tf.ones(8)], [variable])
    np.testing.assert_array_equal(variable.numpy(), np.ones(8))


def _unbuilt(method):
    def run(tmp):
        opt = AdamW8bit()
        if method == "is_8bit":
            opt.is_8bit(keras.Variable(np.zeros(3, "float32")))
        else:
            opt.state_bytes()

    return run


_HYPER = [
    ("learning_rate negative", dict(learning_rate=-1e-3), ValueError),
    ("learning_rate NaN", dict(learning_rate=float("nan")), ValueError),
    ("learning_rate Inf", dict(learning_rate=float("inf")), ValueError),
    ("learning_rate a string", dict(learning_rate="fast"), TypeError),
    ("beta_1 equal to 1", dict(beta_1=1.0), ValueError),
    ("beta_1 above 1", dict(beta_1=1.5), ValueError),
    ("beta_1 a string", dict(beta_1="0.9"), TypeError),
    ("beta_2 negative", dict(beta_2=-0.1), ValueError),
    ("beta_2 NaN", dict(beta_2=float("nan")), ValueError),
    ("epsilon negative", dict(epsilon=-1e-7), ValueError),
    ("epsilon NaN", dict(epsilon=float("nan")), ValueError),
    ("weight_decay negative", dict(weight_decay=-0.01), ValueError),
    ("weight_decay a string", dict(weight_decay="0.01"), TypeError),
    ("block_size zero", dict(block_size=0), ValueError),
    ("block_size a float", dict(block_size=64.0), ValueError),
    ("block_size huge", dict(block_size=2**36), ValueError),
    ("min_8bit_size negative", dict(min_8bit_size=-1), ValueError),
]

CASES += [
    Case(
        "AdamW8bit",
        name,
        lambda tmp, kw=kw: AdamW8bit(**kw),
        Refused(
            error,
            r"must be",
            names=tuple(f"{k}={v!r}" for k, v in kw.items()),
        ),
    )
    for name, kw, error in _HYPER
]
CASES += [
    Case(
        "AdamW8bit",
        "amsgrad=True",
        lambda tmp: AdamW8bit(amsgrad=True),
        Refused(ValueError, r"does not support amsgrad", names=("amsgrad",)),
    ),
    Case(
        "AdamW8bit",
        "an argument of another optimizer",
        lambda tmp: AdamW8bit(momentum=0.9),
        Refused(ValueError, r"not recognized", names=("momentum",)),
    ),
    Case(
        "AdamW8bit",
        "from_optimizer of an SGD",
        lambda tmp: AdamW8bit.from_optimizer(keras.optimizers.SGD()),
        Refused(TypeError, r"supports only", names=("SGD",)),
    ),
    Case(
        "AdamW8bit",
        "from_optimizer of another name",
        lambda tmp: AdamW8bit.from_optimizer("rmsprop"),
        Refused(ValueError, r"supports only", names=("'rmsprop'",)),
    ),
    Case(
        "AdamW8bit",
        "from_optimizer with a bad override",
        lambda tmp: AdamW8bit.from_optimizer("adamw", beta_2=1.0),
        Refused(ValueError, r"must be in \[0, 1\)", names=("beta_2=1.0",)),
    ),
    Case(
        "AdamW8bit",
        "is_8bit before build",
        _unbuilt("is_8bit"),
        Refused(ValueError, r"needs a built optimizer", names=("is_8bit",)),
    ),
    Case(
        "AdamW8bit",
        "state_bytes before build",
        _unbuilt("state_bytes"),
        Refused(ValueError, r"needs a built optimizer", names=("state_bytes",)),
    ),
    Case(
        "AdamW8bit",
        "learning_rate zero leaves the weights",
        _zero_learning_rate,
        Correct(),
    ),
]

# -- quantize_blockwise_8bit / dequantize_blockwise_8bit ---------------------

_MIDS = codes.dynamic_map_midpoints()
_CODE = codes.dynamic_map()


def _non_finite_blocks(tmp):
    values = tf.constant([1.0, np.nan, 2.0, 3.0, -1.0, np.inf, 0.5, 0.25])
    q, absmax = training.quantize_blockwise_8bit(values, _MIDS, 2)
    out = training.dequantize_blockwise_8bit(q, absmax, _CODE, 2).numpy()
    # A block holding NaN or Inf stays non-finite; the others are exact
    # within a code step.
    assert not np.isfinite(out[[0, 1, 4, 5]]).any(), out
    np.testing.assert_allclose(out[[2, 3, 6, 7]], [2, 3, 0.5, 0.25], rtol=0.02)


def _dequantize(q=None, absmax=None, code=_CODE, block_size=4):
    q = np.zeros(10, np.uint8) if q is None else q
    absmax = np.ones(3, np.float32) if absmax is None else absmax
    return lambda tmp: training.dequantize_blockwise_8bit(
        q, absmax, code, block_size
    )


CASES += [
    Case(
        "quantize_blockwise_8bit",
        "block_size zero",
        lambda tmp: training.quantize_blockwise_8bit(tf.ones(10), _MIDS, 0),
        Refused(ValueError, r"must be a positive int", names=("block_size=0",)),
    ),
    Case(
        "quantize_blockwise_8bit",
        "block_size a float",
        lambda tmp: training.quantize_blockwise_8bit(tf.ones(10), _MIDS, 2.5),
        Refused(ValueError, r"must be a positive int", names=("block_size",)),
    ),
    Case(
        "quantize_blockwise_8bit",
        "midpoints of the wrong length",
        lambda tmp: training.quantize_blockwise_8bit(
            tf.ones(10), _MIDS[:15], 4
        ),
        Refused(ValueError, r"table of 255 values", names=("midpoints",)),
    ),
    Case(
        "quantize_blockwise_8bit",
        "NaN and Inf values",
        _non_finite_blocks,
        Correct(),
    ),
    Case(
        "dequantize_blockwise_8bit",
        "absmax of the wrong length",
        _dequantize(absmax=np.ones(2, np.float32)),
        Refused(ValueError, r"one scale per block", names=("absmax", "(3,)")),
    ),
    Case(
        "dequantize_blockwise_8bit",
        "code table of the wrong length",
        _dequantize(code=_CODE[:16]),
        Refused(ValueError, r"table of 256 values", names=("code",)),
    ),
    Case(
        "dequantize_blockwise_8bit",
        "codes not 1-D",
        _dequantize(q=np.zeros((2, 5), np.uint8)),
        Refused(ValueError, r"must be 1-D", names=("q",)),
    ),
    Case(
        "dequantize_blockwise_8bit",
        "block_size zero",
        _dequantize(block_size=0),
        Refused(ValueError, r"must be a positive int", names=("block_size",)),
    ),
]
