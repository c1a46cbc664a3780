"""Catalog cases (see catalog.py): `compile` / `fit` on the model `apply()`
returns, and `QLoRAModel` itself (construction, attribute read-through).

Models are a Sequential of two small Dense layers (8 -> 16 -> 4) with LoRA
on "q".
"""

import keras
import numpy as np

import keras_qlora
from keras_qlora.adapters import NonFiniteError
from keras_qlora.training import AdamW8bit
from keras_qlora.training import HostOffloadOptimizer
from keras_qlora.training import TrainingOptions

from ._training_support import _compiled
from ._training_support import _fit
from ._training_support import _float_model
from ._training_support import _qlora
from ._training_support import _values
from .catalog import Case
from .catalog import Correct
from .catalog import Refused
from .catalog import files_kept


def _nf4_state(model):
    layer = model.qlora_layers()["q"]
    return {
        name: np.array(v.numpy())
        for name, v in layer._variable_table()
        if name.startswith("nf4")
    }


def _with_policy(policy, run):
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        return run()
    finally:
        keras.config.set_dtype_policy(old)


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
CASES = [
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
