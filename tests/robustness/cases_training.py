"""Catalog cases (see catalog.py): the training entry points.

`keras_qlora.training` (`TrainingOptions`, `HostOffloadOptimizer`,
`AdamW8bit` and its blockwise quantizer, `AdapterCheckpoint`,
`save_checkpoint` / `latest_checkpoint` / `restore_checkpoint`), gradient
checkpointing (`enable_gradient_checkpointing`, its `apply()` option,
`disable_gradient_checkpointing`, `checkpointed_layers`), `compile` / `fit`
on the model `apply()` returns, and `QLoRAModel` itself (construction,
attribute read-through).

Models are a Sequential of two small Dense layers (8 -> 16 -> 4) with LoRA
on "q"; one case uses a two-block keras_hub BERT of hidden size 16.
"""

import dataclasses
import warnings

import keras
import numpy as np
import tensorflow as tf

import keras_qlora
from keras_qlora import training
from keras_qlora.adapters import NonFiniteError
from keras_qlora.quantizers import codes
from keras_qlora.training import AdamW8bit
from keras_qlora.training import AdapterCheckpoint
from keras_qlora.training import HostOffloadOptimizer
from keras_qlora.training import TrainingOptions

from .catalog import Case
from .catalog import Correct
from .catalog import Refused
from .catalog import files_kept

# -- helpers ----------------------------------------------------------------


def _float_model(name="float_net"):
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, name="q"),
            keras.layers.Dense(4, name="head"),
        ],
        name=name,
    )


def _qlora(**options):
    options.setdefault("target_modules", ["q"])
    return keras_qlora.apply(_float_model(), rank=2, verbose=False, **options)


def _compiled(optimizer="adam", **options):
    model = _qlora(**options)
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _data(nan=False):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8)).astype("float32")
    if nan:
        x[:] = np.nan
    return x, np.ones((16, 4), "float32")


def _fit(model, epochs=1, nan=False, callbacks=()):
    x, y = _data(nan)
    return model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def _nf4_state(model):
    layer = model.qlora_layers()["q"]
    return {
        name: np.array(v.numpy())
        for name, v in layer._variable_table()
        if name.startswith("nf4")
    }


def _lora(model):
    return model.qlora_layers(lora_only=True)["q"]


def _with_policy(policy, run):
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        return run()
    finally:
        keras.config.set_dtype_policy(old)


def _good_checkpoint(tmp, **kw):
    """A model trained one epoch with one good checkpoint in tmp/run."""
    model = _compiled()
    _fit(model, callbacks=[AdapterCheckpoint(tmp / "run", **kw)])
    return model, tmp / "run"


def _warns(match, run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    texts = [str(w.message) for w in caught]
    assert any(match in t for t in texts), f"no warning {match!r}: {texts}"
    return result


# -- TrainingOptions --------------------------------------------------------


def _options_check_model(tmp):
    TrainingOptions(offload_optimizer=True).check_model(has_lora=False)


def _options_frozen(tmp):
    TrainingOptions().bias = "all"


def _options_on_apply_without_lora(tmp):
    float_model = _float_model()
    before = _values(float_model.weights)
    try:
        keras_qlora.apply(
            float_model, target_modules=None, optimizer_8bit=True, verbose=False
        )
    finally:
        # Refused before editing: the float model is as it was.
        assert [type(x).__name__ for x in float_model.layers] == [
            "Dense",
            "Dense",
        ]
        for got, want in zip(_values(float_model.weights), before, strict=True):
            np.testing.assert_array_equal(got, want)


_OPTIONS = [
    ("bias not a mode", dict(bias="some"), ValueError, "bias='some'"),
    ("bias None", dict(bias=None), ValueError, "bias=None"),
    (
        "offload_optimizer a string",
        dict(offload_optimizer="yes"),
        TypeError,
        "offload_optimizer='yes'",
    ),
    (
        "optimizer_8bit an int",
        dict(optimizer_8bit=1),
        TypeError,
        "optimizer_8bit=1",
    ),
    (
        "gradient_checkpointing a number",
        dict(gradient_checkpointing=3),
        TypeError,
        "gradient_checkpointing=3",
    ),
    (
        "gradient_checkpointing an invalid regex",
        dict(gradient_checkpointing="block_["),
        ValueError,
        "gradient_checkpointing='block_['",
    ),
    (
        "gradient_checkpointing list holding a non-string",
        dict(gradient_checkpointing=["block_0", 3]),
        TypeError,
        "gradient_checkpointing=['block_0', 3]",
    ),
]

CASES = [
    Case(
        "TrainingOptions",
        name,
        lambda tmp, kw=kw: TrainingOptions(**kw),
        Refused(error, r"must be|Received", names=(named,)),
    )
    for name, kw, error, named in _OPTIONS
]
CASES += [
    Case(
        "TrainingOptions",
        "from_dict with an unknown key",
        lambda tmp: TrainingOptions.from_dict({"bias": "all", "rank": 4}),
        Refused(ValueError, r"Unknown training options", names=("rank",)),
    ),
    Case(
        "TrainingOptions",
        "from_dict given a string",
        lambda tmp: TrainingOptions.from_dict("bias"),
        Refused(TypeError, r"must be a dict", names=("'bias'",)),
    ),
    Case(
        "TrainingOptions",
        "from_dict with a bad value",
        lambda tmp: TrainingOptions.from_dict({"bias": "most"}),
        Refused(ValueError, r"bias must be one of", names=("'most'",)),
    ),
    Case(
        "TrainingOptions",
        "replace with an unknown field",
        lambda tmp: TrainingOptions().replace(rank=8),
        Refused(TypeError, r"unexpected keyword argument", names=("rank",)),
    ),
    Case(
        "TrainingOptions",
        "assigning a field after creation",
        _options_frozen,
        Refused(
            dataclasses.FrozenInstanceError,
            r"cannot assign to field",
            names=("bias",),
        ),
    ),
    Case(
        "TrainingOptions",
        "item lookup of an unknown option",
        lambda tmp: TrainingOptions()["rank"],
        Refused(KeyError, r"rank"),
    ),
    Case(
        "TrainingOptions",
        "check_model: offload without LoRA",
        _options_check_model,
        Refused(
            ValueError, r"needs LoRA adapters", names=("offload_optimizer",)
        ),
    ),
    Case(
        "TrainingOptions",
        "optimizer_8bit on apply() without LoRA",
        _options_on_apply_without_lora,
        Refused(ValueError, r"needs LoRA adapters", names=("optimizer_8bit",)),
    ),
]

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
CASES += [
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

# -- AdapterCheckpoint ------------------------------------------------------


def _fit_into(directory, model=None, **kw):
    def run(tmp):
        m = _compiled() if model is None else model()
        _fit(m, callbacks=[AdapterCheckpoint(directory(tmp), **kw)])

    return run


def _nan_fit(on_non_finite):
    def run(tmp):
        model, run_dir = _good_checkpoint(tmp, keep=1)
        checkpoint = AdapterCheckpoint(
            run_dir, keep=1, on_non_finite=on_non_finite
        )
        with files_kept(run_dir):
            history = _warns(
                "skipped the checkpoint",
                lambda: _fit(model, 3, nan=True, callbacks=[checkpoint]),
            )
        losses = history.history["loss"]
        assert np.isnan(losses).all(), losses
        # "warn" trains on, "stop" stops after the first bad epoch.
        assert len(losses) == (3 if on_non_finite == "warn" else 1), losses
        # The good checkpoint brings the diverged model back.
        assert training.restore_checkpoint(model, run_dir) == 1
        for value in _values(model.trainable_variables):
            assert np.isfinite(value).all()

    return run


def _nan_fit_raise(tmp):
    model, run_dir = _good_checkpoint(tmp)
    checkpoint = AdapterCheckpoint(run_dir, on_non_finite="raise")
    with files_kept(run_dir):
        _fit(model, 2, nan=True, callbacks=[checkpoint])


def _next_name_taken(tmp):
    model, run_dir = _good_checkpoint(tmp)
    (run_dir / "ckpt-000002").write_bytes(b"a file the user put there")
    with files_kept(run_dir):
        _fit(model, callbacks=[AdapterCheckpoint(run_dir)])


def _file(tmp):
    path = tmp / "file"
    path.write_bytes(b"x")
    return path


_KEEP = [
    ("keep zero", 0),
    ("keep negative", -1),
    ("keep a float", 2.5),
    ("keep True", True),
    ("keep a string", "3"),
]
CASES += [
    Case(
        "AdapterCheckpoint",
        name,
        lambda tmp, keep=keep: AdapterCheckpoint(tmp / "run", keep=keep),
        Refused(
            ValueError, r"keep must be a positive int", names=(f"{keep!r}",)
        ),
    )
    for name, keep in _KEEP
]
CASES += [
    Case(
        "AdapterCheckpoint",
        f"on_non_finite {value!r}",
        lambda tmp, value=value: AdapterCheckpoint(
            tmp / "run", on_non_finite=value
        ),
        Refused(
            ValueError,
            r"on_non_finite must be one of",
            names=(f"on_non_finite={value!r}",),
        ),
    )
    for value in ("ignore", None, "WARN")
]
CASES += [
    Case(
        "AdapterCheckpoint",
        f"save_freq {value!r}",
        lambda tmp, value=value: AdapterCheckpoint(
            tmp / "run", save_freq=value
        ),
        Refused(
            ValueError,
            r"save_freq must be 'epoch' or a positive int",
            names=(f"save_freq={value!r}",),
        ),
    )
    for value in (0, "batch", 2.5)
]
CASES += [
    Case(
        "AdapterCheckpoint",
        "directory None",
        lambda tmp: AdapterCheckpoint(None),
        Refused(TypeError, r"must be a path", names=("directory=None",)),
    ),
    Case(
        "AdapterCheckpoint",
        "directory is a file",
        _fit_into(_file),
        Refused(NotADirectoryError, r"is a file", names=("{tmp}/file",)),
    ),
    Case(
        "AdapterCheckpoint",
        "directory below a file",
        _fit_into(lambda tmp: _file(tmp) / "run"),
        Refused(NotADirectoryError, r"is a file", names=("{tmp}/file",)),
    ),
    Case(
        "AdapterCheckpoint",
        "fit of a plain Keras model",
        _fit_into(
            lambda tmp: tmp / "run",
            model=lambda: _plain_compiled(),
        ),
        Refused(
            TypeError, r"expects the model returned by", names=("Sequential",)
        ),
    ),
    Case(
        "AdapterCheckpoint",
        "fit of a model without LoRA",
        _fit_into(
            lambda tmp: tmp / "run",
            model=lambda: _compiled(target_modules=None),
        ),
        Refused(
            ValueError, r"has no LoRA layers", names=("AdapterCheckpoint",)
        ),
    ),
    Case(
        "AdapterCheckpoint",
        "NaN losses, on_non_finite='warn'",
        _nan_fit("warn"),
        Correct(),
    ),
    Case(
        "AdapterCheckpoint",
        "NaN losses, on_non_finite='stop'",
        _nan_fit("stop"),
        Correct(),
    ),
    Case(
        "AdapterCheckpoint",
        "NaN losses, on_non_finite='raise'",
        _nan_fit_raise,
        Refused(
            NonFiniteError,
            r"NaN or Inf values; training has diverged",
            names=("lora_a_momentum",),
        ),
    ),
    Case(
        "AdapterCheckpoint",
        "next checkpoint name taken by a file",
        _next_name_taken,
        Refused(FileExistsError, r"already exists", names=("ckpt-000002",)),
    ),
]


def _plain_compiled():
    model = _float_model()
    model.compile(optimizer="adam", loss="mse")
    return model


# -- save_checkpoint / latest_checkpoint / restore_checkpoint ---------------


def _save_after_good(**kw):
    def run(tmp):
        model, run_dir = _good_checkpoint(tmp)
        _fit(model, callbacks=[AdapterCheckpoint(tmp / "other")])
        with files_kept(run_dir):
            training.save_checkpoint(model, run_dir, **kw)

    return run


def _save(model, directory=None, **kw):
    def run(tmp):
        target = tmp / "run" if directory is None else directory(tmp)
        training.save_checkpoint(model(), target, **kw)

    return run


CASES += [
    Case(
        "save_checkpoint",
        "epoch negative",
        _save(_compiled, epoch=-1),
        Refused(ValueError, r"non-negative int", names=("epoch=-1",)),
    ),
    Case(
        "save_checkpoint",
        "keep negative (pruned the oldest before)",
        _save_after_good(epoch=2, keep=-1),
        Refused(ValueError, r"keep must be a positive int", names=("keep=-1",)),
    ),
    Case(
        "save_checkpoint",
        "keep zero",
        _save_after_good(epoch=2, keep=0),
        Refused(ValueError, r"keep must be a positive int", names=("keep=0",)),
    ),
    Case(
        "save_checkpoint",
        "extra not JSON",
        _save_after_good(epoch=2, extra={"started": object()}),
        Refused(TypeError, r"dict of JSON values", names=("extra",)),
    ),
    Case(
        "save_checkpoint",
        "extra not a dict",
        _save_after_good(epoch=2, extra=["step", 3]),
        Refused(
            TypeError, r"dict of JSON values", names=("extra=['step', 3]",)
        ),
    ),
    Case(
        "save_checkpoint",
        "model not compiled",
        _save(_qlora, epoch=0),
        Refused(ValueError, r"is not compiled", names=("save_checkpoint",)),
    ),
    Case(
        "save_checkpoint",
        "a plain Keras model",
        _save(_plain_compiled, epoch=0),
        Refused(
            TypeError, r"expects the model returned by", names=("Sequential",)
        ),
    ),
    Case(
        "save_checkpoint",
        "directory None",
        _save(_compiled, directory=lambda tmp: None, epoch=0),
        Refused(TypeError, r"must be a path", names=("directory=None",)),
    ),
    Case(
        "latest_checkpoint",
        "directory None",
        lambda tmp: training.latest_checkpoint(None),
        Refused(TypeError, r"must be a path", names=("latest_checkpoint",)),
    ),
    Case(
        "latest_checkpoint",
        "directory is a file",
        lambda tmp: _is_none(training.latest_checkpoint(_file(tmp))),
        Correct(),
    ),
    Case(
        "restore_checkpoint",
        "directory not a path (training group)",
        lambda tmp: training.restore_checkpoint(_compiled(), 3),
        Refused(TypeError, r"must be a path", names=("directory=3",)),
    ),
]


def _is_none(value):
    assert value is None, value


# -- gradient checkpointing -------------------------------------------------


def _enable_twice_on_bert(tmp):
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    first = training.enable_gradient_checkpointing(backbone)
    second = training.enable_gradient_checkpointing(backbone)
    assert first == second == ["transformer_layer_0", "transformer_layer_1"]
    # One wrapper each: one disable restores the class's own call.
    assert training.disable_gradient_checkpointing(backbone) == first
    block = backbone.transformer_layers[0]
    assert "call" not in vars(block), "wrapped twice"
    assert training.disable_gradient_checkpointing(backbone) == []


def _remat_scope(tmp):
    with keras.RematScope(mode="full"):
        model = _float_model()
    training.enable_gradient_checkpointing(model, ["q"])


CASES += [
    Case(
        "enable_gradient_checkpointing",
        "model without transformer blocks",
        lambda tmp: training.enable_gradient_checkpointing(_float_model()),
        Refused(
            ValueError,
            r"No transformer blocks recognized",
            names=("q (Dense)", "blocks="),
        ),
    ),
    Case(
        "enable_gradient_checkpointing",
        "not a model",
        lambda tmp: training.enable_gradient_checkpointing("model.keras"),
        Refused(TypeError, r"expects a Keras model or layer", names=("str",)),
    ),
    Case(
        "enable_gradient_checkpointing",
        "blocks=False",
        lambda tmp: training.enable_gradient_checkpointing(
            _float_model(), False
        ),
        Refused(
            ValueError,
            r"disable_gradient_checkpointing",
            names=("blocks=False",),
        ),
    ),
    Case(
        "enable_gradient_checkpointing",
        "blocks a number",
        lambda tmp: training.enable_gradient_checkpointing(_float_model(), 3),
        Refused(TypeError, r"blocks must be", names=("blocks=3",)),
    ),
    Case(
        "enable_gradient_checkpointing",
        "blocks matching nothing",
        lambda tmp: training.enable_gradient_checkpointing(
            _float_model(), ["block_0"]
        ),
        Refused(ValueError, r"matched no layer", names=("'block_0'", "q")),
    ),
    Case(
        "enable_gradient_checkpointing",
        "blocks an invalid regex",
        lambda tmp: training.enable_gradient_checkpointing(
            _float_model(), "block_["
        ),
        Refused(
            ValueError, r"not a valid regular expression", names=("block_[",)
        ),
    ),
    Case(
        "enable_gradient_checkpointing",
        "layers made under keras.RematScope",
        _remat_scope,
        Refused(ValueError, r"RematScope", names=("'q'",)),
    ),
    Case(
        "enable_gradient_checkpointing",
        "twice on a keras_hub backbone",
        _enable_twice_on_bert,
        Correct(),
    ),
    Case(
        "disable_gradient_checkpointing",
        "not a model",
        lambda tmp: training.disable_gradient_checkpointing(3),
        Refused(TypeError, r"expects a Keras model or layer", names=("int",)),
    ),
    Case(
        "disable_gradient_checkpointing",
        "never enabled",
        lambda tmp: _is_empty(
            training.disable_gradient_checkpointing(_float_model())
        ),
        Correct(),
    ),
    Case(
        "checkpointed_layers",
        "not a model",
        lambda tmp: training.checkpointed_layers([1]),
        Refused(TypeError, r"expects a Keras model or layer", names=("list",)),
    ),
]


def _is_empty(value):
    assert value == [], value


def _apply_gc_no_blocks(tmp):
    float_model = _float_model()
    try:
        keras_qlora.apply(
            float_model,
            target_modules=["q"],
            gradient_checkpointing=True,
            verbose=False,
        )
    finally:
        # Refused before the model was quantized.
        assert type(float_model.get_layer("q")).__name__ == "Dense"


def _apply_gc_then_enable(tmp):
    model = _qlora(gradient_checkpointing=["q"])
    assert training.enable_gradient_checkpointing(model, ["q"]) == ["q"]
    assert training.checkpointed_layers(model) == ["q"]
    model.compile(optimizer="adam", loss="mse")
    before = _values(model.trainable_variables)
    loss = _fit(model, epochs=2).history["loss"]
    assert np.isfinite(loss).all(), loss
    after = _values(model.trainable_variables)
    assert any(
        not np.array_equal(a, b) for a, b in zip(after, before, strict=True)
    )


def _apply_gc_then_disable(tmp):
    model = _qlora(gradient_checkpointing=["q"])
    assert training.disable_gradient_checkpointing(model) == ["q"]
    path = tmp / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    # The saved model is the model as it is now, not as apply() made it.
    assert training.checkpointed_layers(reloaded) == []
    assert reloaded.get_config()["training"]["gradient_checkpointing"] is False


CASES += [
    Case(
        "apply(gradient_checkpointing=)",
        "True on a model without blocks",
        _apply_gc_no_blocks,
        Refused(ValueError, r"No transformer blocks recognized", names=("q",)),
    ),
    Case(
        "apply(gradient_checkpointing=)",
        "an invalid regex",
        lambda tmp: _qlora(gradient_checkpointing="q["),
        Refused(
            ValueError,
            r"not a valid regular expression",
            names=("gradient_checkpointing='q['",),
        ),
    ),
    Case(
        "apply(gradient_checkpointing=)",
        "names matching no layer",
        lambda tmp: _qlora(gradient_checkpointing=["block_0"]),
        Refused(ValueError, r"matched no layer", names=("'block_0'",)),
    ),
    Case(
        "apply(gradient_checkpointing=)",
        "then enable_gradient_checkpointing again, and fit",
        _apply_gc_then_enable,
        Correct(),
    ),
    Case(
        "apply(gradient_checkpointing=)",
        "then disabled, saved and reloaded",
        _apply_gc_then_disable,
        Correct(),
    ),
]

# -- compile / fit on the model apply() returns ------------------------------


def _compile(optimizer, **options):
    return lambda tmp: _compiled(optimizer, **options)


def _compile_kind(optimizer, kinds, **options):
    def run(tmp):
        model = _compiled(optimizer(), **options)
        opt = model.optimizer
        got = [type(opt).__name__]
        if isinstance(opt, HostOffloadOptimizer):
            got.append(type(opt.inner_optimizer).__name__)
        assert got == kinds, got
        loss = _fit(model).history["loss"]
        assert np.isfinite(loss).all(), loss

    return run


def _positional_loss(tmp):
    model = _qlora()
    model.compile("adam", "mse")
    assert np.isfinite(_fit(model).history["loss"]).all()


def _fit_uncompiled(tmp):
    _fit(_qlora())


def _fit_nan(tmp):
    model = _compiled()
    path = tmp / "adapter"
    keras_qlora.save_adapter(model, path)
    nf4 = _nf4_state(model)
    history = _fit(model, epochs=2, nan=True)
    # The user sees the NaN loss; the 4-bit base is untouched; the
    # diverged adapter cannot replace the good one on disk.
    assert np.isnan(history.history["loss"]).all(), history.history
    for name, value in _nf4_state(model).items():
        np.testing.assert_array_equal(value, nf4[name], err_msg=name)
    with files_kept(tmp):
        try:
            keras_qlora.save_adapter(model, path, overwrite=True)
        except NonFiniteError as err:
            assert "lora" in str(err), err
        else:
            raise AssertionError("a NaN adapter was saved")


def _fit_disabled(tmp):
    model = _compiled()
    keras_qlora.disable_adapters(model)
    _fit(model)


def _fit_no_lora(tmp):
    _fit(_compiled(target_modules=None))


def _mixed(policy, kinds, **options):
    def run(tmp):
        def train():
            model = _compiled("adamw", **options)
            before = _values(model.trainable_variables)
            loss = _fit(model, epochs=2).history["loss"]
            return model, before, loss

        model, before, loss = _with_policy(policy, train)
        assert np.isfinite(loss).all(), loss
        assert [v.dtype for v in model.trainable_variables] == ["float32"] * 2
        after = _values(model.trainable_variables)
        assert all(
            not np.array_equal(a, b) for a, b in zip(after, before, strict=True)
        )
        opt = model.optimizer
        names = []
        while opt is not None:
            names.append(type(opt).__name__)
            opt = getattr(opt, "inner_optimizer", None)
        assert names == kinds, names

    return run


def _switch_adapter(**options):
    def run(tmp):
        model = _compiled(**options)
        _fit(model)
        keras_qlora.add_adapter(model, "second")
        keras_qlora.set_adapter(model, "second")
        _fit(model)

    return run


def _unfreeze_qlora_layer(tmp):
    model = _compiled()
    nf4 = _nf4_state(model)
    model.base_model.get_layer("q").trainable = True
    model.base_model.get_layer("head").trainable = True
    paths = [v.path.split("/", 1)[1] for v in model.trainable_variables]
    assert paths == ["q/lora_a", "q/lora_b"], paths
    _fit(model)
    for name, value in _nf4_state(model).items():
        np.testing.assert_array_equal(value, nf4[name], err_msg=name)


def _wrong_width(tmp):
    model = _compiled()
    model.fit(np.zeros((4, 5), "float32"), np.zeros((4, 4)), verbose=0)


_8BIT = "optimizer_8bit"
CASES += [
    Case(
        "fit",
        "compile an SGD with optimizer_8bit",
        _compile(keras.optimizers.SGD(0.1), optimizer_8bit=True),
        Refused(TypeError, r"needs an Adam or AdamW", names=(_8BIT, "SGD")),
    ),
    Case(
        "fit",
        "compile 'sgd' by name with optimizer_8bit",
        _compile("sgd", optimizer_8bit=True),
        Refused(TypeError, r"needs an Adam or AdamW", names=(_8BIT, "SGD")),
    ),
    Case(
        "fit",
        "compile an AMSGrad Adam with optimizer_8bit",
        _compile(keras.optimizers.Adam(amsgrad=True), optimizer_8bit=True),
        Refused(ValueError, r"amsgrad=True", names=(_8BIT,)),
    ),
    Case(
        "fit",
        "compile a LossScaleOptimizer with offload_optimizer",
        _compile(
            keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()),
            offload_optimizer=True,
        ),
        Refused(
            TypeError,
            r"offload_optimizer does not support",
            names=("LossScaleOptimizer",),
        ),
    ),
    Case(
        "fit",
        "compile a number as optimizer with offload_optimizer",
        _compile(42, offload_optimizer=True),
        Refused(
            TypeError, r"must be a Keras optimizer", names=("optimizer", "42")
        ),
    ),
    Case(
        "fit",
        "compile an unknown optimizer name",
        _compile("adamm"),
        Refused(ValueError, r"not an optimizer", names=("'adamm'",)),
    ),
    Case(
        "fit",
        "compile a HostOffloadOptimizer with optimizer_8bit",
        _compile_kind(
            lambda: HostOffloadOptimizer(keras.optimizers.AdamW(1e-3)),
            ["HostOffloadOptimizer", "AdamW8bit"],
            optimizer_8bit=True,
        ),
        Correct(),
    ),
    Case(
        "fit",
        "compile an AdamW8bit with offload_optimizer",
        _compile_kind(
            lambda: AdamW8bit(1e-3),
            ["HostOffloadOptimizer", "AdamW8bit"],
            offload_optimizer=True,
        ),
        Correct(),
    ),
    Case(
        "fit",
        "compile with the loss given by position",
        _positional_loss,
        Correct(),
    ),
    Case(
        "fit",
        "fit without compile",
        _fit_uncompiled,
        Refused(ValueError, r"must call `compile\(\)`"),
    ),
    Case("fit", "NaN inputs", _fit_nan, Correct()),
    Case(
        "fit",
        "adapters disabled",
        _fit_disabled,
        Refused(ValueError, r"nothing to train", names=("enable_adapters",)),
    ),
    Case(
        "fit",
        "no LoRA at all (target_modules=None)",
        _fit_no_lora,
        Refused(
            ValueError, r"nothing to train", names=("target_modules=None",)
        ),
    ),
    Case(
        "fit",
        "mixed_bfloat16 with offload_optimizer",
        _mixed(
            "mixed_bfloat16",
            ["HostOffloadOptimizer", "AdamW"],
            offload_optimizer=True,
        ),
        Correct(),
    ),
    Case(
        "fit",
        "mixed_bfloat16 with offload_optimizer and optimizer_8bit",
        _mixed(
            "mixed_bfloat16",
            ["HostOffloadOptimizer", "AdamW8bit"],
            offload_optimizer=True,
            optimizer_8bit=True,
        ),
        Correct(),
    ),
    Case(
        "fit",
        "mixed_float16 with offload_optimizer",
        _mixed(
            "mixed_float16",
            ["LossScaleOptimizer", "HostOffloadOptimizer", "AdamW"],
            offload_optimizer=True,
        ),
        Correct(),
    ),
    Case(
        "fit",
        "set_adapter after compile, offload_optimizer",
        _switch_adapter(offload_optimizer=True),
        Refused(ValueError, r"recompile", names=("lora_a_second",)),
    ),
    Case(
        "fit",
        "set_adapter after compile, optimizer_8bit",
        _switch_adapter(optimizer_8bit=True),
        Refused(ValueError, r"Unknown variable", names=("lora_a_second",)),
    ),
    Case(
        "fit",
        "QLoRA layers set trainable",
        _unfreeze_qlora_layer,
        Correct(),
    ),
    Case(
        "fit",
        "inputs of the wrong width",
        _wrong_width,
        Refused(ValueError, r"incompatible", names=("'q'", "(None, 5)")),
    ),
]

# -- QLoRAModel -------------------------------------------------------------


class _NetWithProperty(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.q = keras.layers.Dense(4, name="q")

    def call(self, x):
        return self.q(x)

    @property
    def tokenizer(self):
        return self.vocabulary_file  # fails: never set


def _failing_property(tmp):
    net = _NetWithProperty(name="net")
    net(np.zeros((1, 8), "float32"))
    model = keras_qlora.apply(net, rank=2, target_modules=["q"], verbose=False)
    model.tokenizer  # noqa: B018


def _read_through(tmp):
    float_model = _float_model()
    float_model.task_note = "summaries"
    model = keras_qlora.apply(
        float_model, rank=2, target_modules=["q"], verbose=False
    )
    assert model.task_note == "summaries"
    assert not hasattr(model, "no_such_attribute")


def _training_dict(tmp):
    model = keras_qlora.QLoRAModel(
        _float_model(), keras_qlora.QLoRASettings(), training={"bias": "all"}
    )
    assert model.training_options == TrainingOptions(bias="all")


CASES += [
    Case(
        "QLoRAModel",
        "missing attribute",
        lambda tmp: _qlora().no_such_attribute,
        Refused(
            AttributeError,
            r"neither has its base model",
            names=(
                "QLoRAModel",
                "no_such_attribute",
                "float_net",
                "Sequential",
            ),
        ),
    ),
    Case(
        "QLoRAModel",
        "missing private attribute",
        lambda tmp: _qlora()._no_such_attribute,
        Refused(
            AttributeError,
            r"has no attribute",
            names=("QLoRAModel", "_no_such_attribute"),
        ),
    ),
    Case(
        "QLoRAModel",
        "a base-model property failing inside",
        _failing_property,
        Refused(
            AttributeError, r"has no attribute", names=("vocabulary_file",)
        ),
    ),
    Case(
        "QLoRAModel",
        "read-through of a base-model attribute",
        _read_through,
        Correct(),
    ),
    Case(
        "QLoRAModel",
        "generate on a model that has none",
        lambda tmp: _qlora().generate("hello"),
        Refused(AttributeError, r"has no generate", names=("float_net",)),
    ),
    Case(
        "QLoRAModel",
        "base_model not a model",
        lambda tmp: keras_qlora.QLoRAModel(
            "model.keras", keras_qlora.QLoRASettings()
        ),
        Refused(TypeError, r"base_model must be a Keras model", names=("str",)),
    ),
    Case(
        "QLoRAModel",
        "settings not QLoRASettings",
        lambda tmp: keras_qlora.QLoRAModel(_float_model(), {"rank": 4}),
        Refused(TypeError, r"must be a QLoRASettings", names=("dict",)),
    ),
    Case(
        "QLoRAModel",
        "training options as a dict",
        _training_dict,
        Correct(),
    ),
    Case(
        "QLoRAModel",
        "training options a string",
        lambda tmp: keras_qlora.QLoRAModel(
            _float_model(), keras_qlora.QLoRASettings(), training="lora_only"
        ),
        Refused(TypeError, r"must be a dict", names=("'lora_only'",)),
    ),
]
