"""Catalog cases (see catalog.py) for `apply()` and what acts on its result:
`QLoRASettings`, the QLoRA layers, named adapters, merge / unmerge,
`summary` / `report.collect`, and `from_preset`'s cheap argument mistakes
(its files are covered by tests/loading/test_preset_errors.py).

Every refused `apply()` also checks that the model was left as it was
(everything is checked before the first layer changes).
"""

import dataclasses
import functools
import pathlib
import re
import tempfile
import warnings

import keras
import numpy as np

import keras_qlora
from keras_qlora.layers import QLoRALayerBase

from .catalog import Case
from .catalog import Correct
from .catalog import Refused

X = np.ones((2, 32), "float32")
QDense = keras_qlora.QLoRADense
QEinsum = keras_qlora.QLoRAEinsumDense
Settings = keras_qlora.QLoRASettings


def _no(entry, name, run, error, match, *names):
    """A case that must be refused with `error`."""
    return Case(entry, name, run, Refused(error, match, names))


def _ok(entry, name, run):
    """A case that must work; `run` asserts the result."""
    return Case(entry, name, run, Correct())


def _call(fn, *args, **kwargs):
    return lambda tmp: fn(*args, **kwargs)


# -- models -------------------------------------------------------------------


def _float_model():
    """Three small Dense layers: query [32, 48], value [48, 40], head."""
    return keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(48, name="query"),
            keras.layers.Dense(40, name="value"),
            keras.layers.Dense(8, name="head"),
        ],
        name="float_model",
    )


def _kernels(model):
    return {
        layer.name: np.array(layer.kernel.numpy())
        for layer in model.layers
        if getattr(layer, "kernel", None) is not None
    }


def _refused_apply(model, **kwargs):
    """`apply(model, **kwargs)`, asserting on refusal that no layer of
    `model` changed."""
    before = _kernels(model)
    try:
        keras_qlora.apply(model, **{"verbose": False, **kwargs})
    finally:
        for layer in model.layers:
            assert not isinstance(layer, QLoRALayerBase), layer.name
        np.testing.assert_equal(_kernels(model), before)


def _bad_apply(**kwargs):
    return lambda tmp: _refused_apply(_float_model(), **kwargs)


def _apply(**kwargs):
    """`apply()` of `_float_model()` with LoRA rank 4 on query and value."""
    kwargs = {"rank": 4, "target_modules": ["query", "value"], **kwargs}
    return keras_qlora.apply(_float_model(), **{"verbose": False, **kwargs})


def _with_layer(kind):
    """A Functional model whose layer `later` (or `mix`) has the defect
    `kind`, placed after a good layer `query`."""
    inp = keras.Input((6, 32))
    h = keras.layers.Dense(48, name="query")(inp)
    if kind == "einsum":
        # Contracts a batched axis too: not one matmul.
        mix = keras.layers.EinsumDense("abc,bcd->abd", (6, 48, 16), name="mix")
        h = mix(h)
    else:
        h = keras.layers.Dense(16, name="later")(h)
    model = keras.Model(inp, keras.layers.Dense(8, name="value")(h))
    later = model.get_layer("later") if kind != "einsum" else None
    if kind == "nan":
        kernel = later.kernel.numpy()
        kernel[3, 5] = np.nan
        later.kernel.assign(kernel)
    elif kind == "inf":
        later.kernel.assign(np.full(later.kernel.shape, np.inf, "float32"))
    elif kind == "lora":
        later.enable_lora(2)
    elif kind == "int8":
        later.quantize("int8")
    return model


def _layer_case(kind, **kwargs):
    kwargs = {"rank": 4, "target_modules": "all-linear", **kwargs}
    return lambda tmp: _refused_apply(_with_layer(kind), **kwargs)


def _dense(units=16, k=32, built=True):
    dense = keras.layers.Dense(units, name="dense")
    if built:
        dense.build((None, k))
    return dense


# -- apply: the model argument ------------------------------------------------


def _apply_twice_base(tmp):
    model = _float_model()
    keras_qlora.apply(model, rank=4, verbose=False)
    keras_qlora.apply(model, rank=4, verbose=False)


def _apply_unbuilt(tmp):
    model = keras.Sequential([keras.layers.Dense(8, name="query")])
    keras_qlora.apply(model, verbose=False)


def _apply_bare_dense(tmp):
    dense = _dense()
    try:
        keras_qlora.apply(dense, verbose=False)
    finally:
        assert dense.kernel.dtype == "float32"


# -- apply: selectors and options that must work -----------------------------


def _raises_key_error(path, layer):
    return {"query": True}[path]


def _returns_path(path, layer):
    return path  # the comparison forgotten: truthy for every layer


def _one_argument(path):
    return path == "query"


def _lora_paths(model):
    return sorted(model.qlora_layers(lora_only=True))


def _verbose_zero(tmp):
    assert _lora_paths(_apply(verbose=0)) == ["query", "value"]


def _numpy_bool_selector(tmp):
    model = _apply(target_modules=lambda p, layer: np.bool_(p == "query"))
    assert _lora_paths(model) == ["query"]


def _pattern_selector(tmp):
    model = _apply(target_modules=re.compile("q.*"), quantize_modules=None)
    assert sorted(model.qlora_layers()) == ["query"]


# -- QLoRASettings ------------------------------------------------------------


def _settings_assign(tmp):
    Settings().rank = 4


def _settings_bad_key(tmp):
    return Settings()["lora_alpha"]


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


# -- named adapters -----------------------------------------------------------


def _with_adapter(name="second"):
    model = _apply()
    keras_qlora.add_adapter(model, name)
    return model


def _no_lora_model():
    return _apply(target_modules=None, quantize_modules=["query"])


def _add_taken(tmp):
    keras_qlora.add_adapter(_with_adapter("second"), "second")


def _delete_active(tmp):
    model = _with_adapter()
    keras_qlora.set_adapter(model, "second")
    keras_qlora.delete_adapter(model, "second")


def _disable_twice(tmp):
    model = _apply()
    keras_qlora.disable_adapters(model)
    keras_qlora.disable_adapters(model)
    assert keras_qlora.adapters_enabled(model) is False
    keras_qlora.enable_adapters(model)
    keras_qlora.enable_adapters(model)
    assert keras_qlora.adapters_enabled(model) is True


def _after_float_merge(fn, *args, **kwargs):
    def run(tmp):
        model = _apply()
        keras_qlora.merge(model)
        fn(model, *args, **kwargs)

    return run


# -- merge / unmerge ----------------------------------------------------------


def _requantize(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return keras_qlora.merge(model, requantize=True)


def _requantize_twice(tmp):
    model = _apply()
    _requantize(model)
    _requantize(model)


def _unmerge_twice(tmp):
    model = _apply()
    _requantize(model)
    keras_qlora.unmerge(model)
    keras_qlora.unmerge(model)


def _unmerge_after_training(tmp):
    model = _apply()
    _requantize(model)
    lora_b = model.qlora_layers()["query"].lora_b
    lora_b.assign(np.ones(lora_b.shape, "float32"))
    keras_qlora.unmerge(model)


def _merge_the_plain_model(tmp):
    keras_qlora.merge(keras_qlora.merge(_apply()))


def _merge_disabled(tmp):
    model = _apply()
    keras_qlora.disable_adapters(model)
    keras_qlora.merge(model)


def _requantize_then_unmerge_exact(tmp):
    model = _apply()
    query = model.qlora_layers()["query"]
    query.lora_b.assign(np.full(query.lora_b.shape, 0.01, "float32"))
    before = model(X).numpy()
    _requantize(model)
    keras_qlora.unmerge(model)
    np.testing.assert_array_equal(model(X).numpy(), before)


# -- from_preset --------------------------------------------------------------


@functools.cache
def _preset_files():
    """`{relative path: bytes}` of a tiny keras_hub Llama preset."""
    import keras_hub

    with tempfile.TemporaryDirectory() as tmp:
        keras_hub.models.LlamaBackbone(
            vocabulary_size=64,
            num_layers=1,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=16,
            intermediate_dim=32,
        ).save_to_preset(tmp)
        root = pathlib.Path(tmp)
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }


def _preset(tmp):
    folder = tmp / "tiny_llama"
    for name, data in _preset_files().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def _a_file(tmp):
    (tmp / "config.json").write_text("{}")
    return tmp / "config.json"


def _llama():
    import keras_hub

    return keras_hub.models.LlamaBackbone


def _llama_instance():
    return _llama()(
        vocabulary_size=8,
        num_layers=1,
        num_query_heads=1,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=8,
    )


def _from_preset(model_class, preset, **kwargs):
    """`from_preset(model_class(), preset(tmp) or preset, ...)`."""

    def run(tmp):
        where = preset(tmp) if callable(preset) else preset
        keras_qlora.from_preset(model_class(), where, verbose=False, **kwargs)

    return run


# -- the catalog --------------------------------------------------------------

_BOOL = r"must be True or False"
_SELECTOR = r"a module selector must be a list of names"
_NOT_QLORA = r"expects the model returned by keras_qlora.apply\(\)"
_BLOCKS = r"one of \(32, 64, 128, 256\)"
_BIAS = r"one of \('none', 'all', 'lora_only'\)"

# (name, apply() arguments, error, message, names) of bad settings.
_APPLY_SETTINGS = [
    ("rank float", {"rank": 2.0}, TypeError, "positive int", "rank=2.0"),
    ("rank string", {"rank": "8"}, TypeError, "positive int", "rank='8'"),
    ("rank bool", {"rank": True}, TypeError, "positive int", "rank=True"),
    ("rank zero", {"rank": 0}, ValueError, "positive int", "rank=0"),
    ("rank negative", {"rank": -4}, ValueError, "positive int", "rank=-4"),
    ("rank None with targets", {"rank": None}, ValueError,
     "target_modules=None", "rank=None"),
    ("alpha NaN", {"alpha": float("nan")}, ValueError, "finite", "alpha=nan"),
    ("alpha Inf", {"alpha": float("inf")}, ValueError, "finite", "alpha=inf"),
    ("alpha string", {"alpha": "16"}, TypeError, "a number", "alpha='16'"),
    ("dropout 1.0", {"dropout": 1.0}, ValueError, r"\[0, 1\)",
     "dropout=1.0"),
    ("dropout negative", {"dropout": -0.1}, ValueError, r"\[0, 1\)",
     "dropout=-0.1"),
    ("dropout None", {"dropout": None}, TypeError, "a number",
     "dropout=None"),
    ("block_size 48", {"block_size": 48}, ValueError, _BLOCKS,
     "block_size=48"),
    ("block_size float", {"block_size": 64.0}, TypeError, _BLOCKS,
     "block_size=64.0"),
    ("double_quant string", {"double_quant": "yes"}, TypeError, _BOOL,
     "double_quant='yes'"),
    ("scale_search None", {"scale_search": None}, TypeError, _BOOL,
     "scale_search=None"),
    ("use_rslora int", {"use_rslora": 1}, TypeError, _BOOL, "use_rslora=1"),
    ("bias unknown mode", {"bias": "some"}, ValueError, _BIAS, "bias='some'"),
    ("bias True", {"bias": True}, ValueError, _BIAS, "bias=True"),
    ("offload_optimizer int", {"offload_optimizer": 1}, TypeError, _BOOL,
     "offload_optimizer=1"),
    ("optimizer_8bit string", {"optimizer_8bit": "yes"}, TypeError, _BOOL,
     "optimizer_8bit='yes'"),
    ("optimizer_8bit without LoRA",
     {"optimizer_8bit": True, "target_modules": None}, ValueError,
     "needs LoRA adapters", "optimizer_8bit"),
    ("offload_optimizer without LoRA",
     {"offload_optimizer": True, "target_modules": None}, ValueError,
     "needs LoRA adapters", "offload_optimizer"),
    ("gradient_checkpointing int", {"gradient_checkpointing": 1}, TypeError,
     "True, False, or a selector", "gradient_checkpointing=1"),
    ("gradient_checkpointing True without blocks",
     {"gradient_checkpointing": True}, ValueError,
     "No transformer blocks recognized", "gradient_checkpointing=["),
    ("gradient_checkpointing names no layer",
     {"gradient_checkpointing": ["block_0"]}, ValueError, "matched no layer",
     "gradient_checkpointing=['block_0']"),
    ("verbose a string", {"verbose": "quiet"}, TypeError, "verbose must be",
     "verbose='quiet'"),
    ("unknown keyword", {"colour": "red"}, TypeError, "unexpected keyword",
     "colour"),
    ("PEFT's lora_alpha keyword", {"lora_alpha": 16}, TypeError,
     "unexpected keyword", "lora_alpha"),
]  # fmt: skip

# (name, apply() arguments, error, message, names) of bad selectors.
_APPLY_SELECTORS = [
    ("target_modules an int", {"target_modules": 5}, TypeError, _SELECTOR,
     "target_modules=5"),
    ("target_modules a dict", {"target_modules": {"query": 8}}, TypeError,
     _SELECTOR, "target_modules={'query': 8}"),
    ("target_modules a list holding an int", {"target_modules": ["query", 3]},
     TypeError, "non-empty strings", "target_modules=['query', 3]"),
    ("target_modules a list holding ''", {"target_modules": [""]}, TypeError,
     "non-empty strings", "target_modules=['']"),
    ("target_modules an empty list", {"target_modules": []}, ValueError,
     r"Target modules \[\] not found", "query, value, head"),
    ("target_modules a bad regex", {"target_modules": "query("}, ValueError,
     "not a valid regular expression", "target_modules='query('"),
    ("target_modules match nothing", {"target_modules": ["qkv"]}, ValueError,
     "not found in the model", "['qkv']", "query, value, head"),
    ("target_modules callable raises",
     {"target_modules": _raises_key_error}, ValueError,
     "raised KeyError on layer 'value'", "target_modules",
     "_raises_key_error"),
    ("target_modules callable of one argument",
     {"target_modules": _one_argument}, ValueError, "raised TypeError",
     "target_modules", "_one_argument"),
    ("target_modules callable returns a string",
     {"target_modules": _returns_path}, TypeError,
     "must return True or False", "target_modules", "_returns_path",
     "'query'"),
    ("quantize_modules an int", {"quantize_modules": 7}, TypeError,
     _SELECTOR, "quantize_modules=7"),
    ("exclude_modules a bad regex", {"exclude_modules": "[head"}, ValueError,
     "not a valid regular expression", "exclude_modules='[head'"),
    ("exclude_modules removes every target",
     {"target_modules": ["query"], "exclude_modules": ["query"]},
     ValueError, "removed every one of them", "['query']"),
    ("modules_to_save a dict", {"modules_to_save": {"head": True}},
     TypeError, _SELECTOR, "modules_to_save={'head': True}"),
    ("modules_to_save matches nothing", {"modules_to_save": ["classifier"]},
     ValueError, "matched no layer", "['classifier']", "head"),
]  # fmt: skip

CASES = [
    # apply: the model argument and its layers
    _no("apply", "not a model (int)", _call(keras_qlora.apply, 42),
        TypeError, "expects a Keras model or layer", "int"),
    _no("apply", "a path string instead of a model",
        _call(keras_qlora.apply, "model.keras"), TypeError,
        "expects a Keras model or layer", "str"),
    _no("apply", "unbuilt model", _apply_unbuilt, ValueError, "is not built",
        "'sequential"),
    _no("apply", "already applied (the QLoRAModel)",
        lambda tmp: keras_qlora.apply(_apply(), verbose=False), ValueError,
        "already applied: this is a QLoRAModel"),
    _no("apply", "already applied (the edited base model)",
        _apply_twice_base, ValueError, "already applied to this model",
        "query"),
    _no("apply", "a bare Dense layer", _apply_bare_dense, ValueError,
        "bare Dense layer.*from_layer", "'dense'"),
    _no("apply", "layer with a NaN kernel", _layer_case("nan"), ValueError,
        "kernel has 1 non-finite", "'later'"),
    _no("apply", "layer with an Inf kernel", _layer_case("inf"), ValueError,
        "kernel has 768 non-finite", "'later'"),
    _no("apply", "EinsumDense that is not one matmul", _layer_case("einsum"),
        ValueError, "does not reduce to a single matmul", "abc,bcd->abd"),
    _no("apply", "layer with Keras' own LoRA", _layer_case("lora"),
        ValueError, "has Keras' own LoRA enabled", "'later'"),
    _no("apply", "layer quantized int8 by Keras", _layer_case("int8"),
        ValueError, "already quantized by Keras", "'later'", "int8"),
    _no("apply", "rank above a layer's min(K, N)",
        _layer_case("none", rank=32), ValueError,
        r"rank must be <= min\(K, N\) = 16", "'later'", "rank=32"),
    # apply: settings, options and selectors
    *(_no("apply", name, _bad_apply(**kwargs), error, match, *names)
      for name, kwargs, error, match, *names in _APPLY_SETTINGS),
    *(_no("apply", name, _bad_apply(**kwargs), error, match, *names)
      for name, kwargs, error, match, *names in _APPLY_SELECTORS),
    _ok("apply", "verbose=0 (Keras style)", _verbose_zero),
    _ok("apply", "target_modules callable returns numpy bool",
        _numpy_bool_selector),
    _ok("apply", "target_modules a re.Pattern", _pattern_selector),
    # QLoRASettings
    _no("QLoRASettings", "rank string", _call(Settings, rank="4"), TypeError,
        "positive int or None", "rank='4'"),
    _no("QLoRASettings", "block_size 100", _call(Settings, block_size=100),
        ValueError, _BLOCKS, "block_size=100"),
    _no("QLoRASettings", "alpha numpy NaN",
        _call(Settings, alpha=np.float32("nan")), ValueError, "finite",
        "alpha="),
    _no("QLoRASettings", "from_dict of a list",
        _call(Settings.from_dict, ["rank", 4]), TypeError, "must be a dict",
        "list"),
    _no("QLoRASettings", "from_dict in the layer-config spelling",
        _call(Settings.from_dict, {"lora_alpha": 8}), ValueError,
        "Unknown QLoRA settings", "lora_alpha"),
    _no("QLoRASettings", "from_dict with a bad value",
        _call(Settings.from_dict, {"dropout": 2}), ValueError, r"\[0, 1\)",
        "dropout=2"),
    _no("QLoRASettings", "replace with a bad value",
        _call(Settings().replace, rank=0), ValueError, "positive int",
        "rank=0"),
    _no("QLoRASettings", "replace with an unknown field",
        _call(Settings().replace, ranks=4), TypeError, "unexpected keyword",
        "ranks"),
    _no("QLoRASettings", "assigning a field", _settings_assign,
        dataclasses.FrozenInstanceError, "cannot assign", "rank"),
    _no("QLoRASettings", "reading an unknown key", _settings_bad_key,
        KeyError, "lora_alpha", "lora_alpha"),
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
    # named adapters
    _no("add_adapter", "a plain Keras model",
        lambda tmp: keras_qlora.add_adapter(_float_model(), "second"),
        TypeError, _NOT_QLORA, "add_adapter", "Sequential"),
    _no("add_adapter", "the name 'default'",
        lambda tmp: keras_qlora.add_adapter(_apply(), "default"), ValueError,
        "already has an adapter named", "'default'"),
    _no("add_adapter", "the same name twice", _add_taken, ValueError,
        "already has an adapter named", "'second'"),
    _no("add_adapter", "name with a slash",
        lambda tmp: keras_qlora.add_adapter(_apply(), "task/b"), ValueError,
        "1-64 letters, digits", "name='task/b'"),
    _no("add_adapter", "empty name",
        lambda tmp: keras_qlora.add_adapter(_apply(), ""), ValueError,
        "1-64 letters, digits", "name=''"),
    _no("add_adapter", "name an int",
        lambda tmp: keras_qlora.add_adapter(_apply(), 2), TypeError,
        "must be a string", "name=2"),
    _no("add_adapter", "model without LoRA layers",
        lambda tmp: keras_qlora.add_adapter(_no_lora_model(), "second"),
        ValueError, "has no LoRA layers", "add_adapter"),
    _no("set_adapter", "unknown name",
        lambda tmp: keras_qlora.set_adapter(_with_adapter(), "third"),
        ValueError, "no adapter named 'third'", "['default', 'second']"),
    _no("set_adapter", "name None",
        lambda tmp: keras_qlora.set_adapter(_apply(), None), TypeError,
        "must be a string", "name=None"),
    _no("set_adapter", "a string instead of a model",
        _call(keras_qlora.set_adapter, "model", "default"), TypeError,
        _NOT_QLORA, "set_adapter", "str"),
    _no("set_adapter", "after a float merge",
        _after_float_merge(keras_qlora.set_adapter, "default"), RuntimeError,
        "was merged into the plain model", "float_model"),
    _no("delete_adapter", "the default adapter",
        lambda tmp: keras_qlora.delete_adapter(_with_adapter(), "default"),
        ValueError, "Cannot delete adapter 'default'"),
    _no("delete_adapter", "the active adapter", _delete_active, ValueError,
        "Cannot delete adapter 'second'.*active"),
    _no("delete_adapter", "unknown name",
        lambda tmp: keras_qlora.delete_adapter(_with_adapter(), "third"),
        ValueError, "no adapter named 'third'", "'second'"),
    _no("delete_adapter", "name an int",
        lambda tmp: keras_qlora.delete_adapter(_with_adapter(), 1),
        TypeError, "must be a string", "name=1"),
    _no("enable_adapters", "a plain Keras model",
        lambda tmp: keras_qlora.enable_adapters(_float_model()), TypeError,
        _NOT_QLORA, "enable_adapters"),
    _no("disable_adapters", "model without LoRA layers",
        lambda tmp: keras_qlora.disable_adapters(_no_lora_model()),
        ValueError, "has no LoRA layers", "disable_adapters"),
    _ok("disable_adapters", "twice, then enable twice", _disable_twice),
    _no("list_adapters", "None", _call(keras_qlora.list_adapters, None),
        TypeError, _NOT_QLORA, "list_adapters", "NoneType"),
    _no("active_adapter", "model without LoRA layers",
        lambda tmp: keras_qlora.active_adapter(_no_lora_model()), ValueError,
        "has no LoRA layers", "active_adapter"),
    # merge / unmerge
    _no("merge", "a plain Keras model",
        lambda tmp: keras_qlora.merge(_float_model()), TypeError, _NOT_QLORA,
        "merge", "Sequential"),
    _no("merge", "the plain model a merge returned", _merge_the_plain_model,
        TypeError, _NOT_QLORA, "merge", "Sequential"),
    _no("merge", "float merge twice", _after_float_merge(keras_qlora.merge),
        ValueError, "already merged into the plain model", "float_model"),
    _no("merge", "requantize twice", _requantize_twice, ValueError,
        "merged with requantize=True.*unmerge"),
    _no("merge", "requantize a string",
        lambda tmp: keras_qlora.merge(_apply(), requantize="yes"), TypeError,
        _BOOL, "requantize='yes'"),
    _no("merge", "safe an int", lambda tmp: keras_qlora.merge(_apply(), safe=1),
        TypeError, _BOOL, "safe=1"),
    _no("merge", "adapter an int",
        lambda tmp: keras_qlora.merge(_apply(), adapter=0), TypeError,
        "must be a string", "adapter=0"),
    _no("merge", "unknown adapter",
        lambda tmp: keras_qlora.merge(_apply(), adapter="other"), ValueError,
        "no adapter named 'other'", "['default']"),
    _no("merge", "adapters disabled", _merge_disabled, ValueError,
        "adapters are disabled", "enable_adapters"),
    _no("merge", "requantize without LoRA",
        lambda tmp: keras_qlora.merge(_no_lora_model(), requantize=True),
        ValueError, "has no LoRA layers", "requantize=True"),
    _ok("merge", "requantize then unmerge is exact",
        _requantize_then_unmerge_exact),
    _no("unmerge", "never merged",
        lambda tmp: keras_qlora.unmerge(_apply()), ValueError,
        "nothing to undo", "unmerge"),
    _no("unmerge", "twice", _unmerge_twice, ValueError, "nothing to undo",
        "unmerge"),
    _no("unmerge", "after a float merge",
        _after_float_merge(keras_qlora.unmerge), ValueError,
        "neither merged again nor unmerged", "unmerge"),
    _no("unmerge", "adapter changed since the merge", _unmerge_after_training,
        ValueError, r"changed since merge\(requantize=True\).*force=True",
        "'query'"),
    _no("unmerge", "force a string",
        lambda tmp: keras_qlora.unmerge(_apply(), force="yes"), TypeError,
        _BOOL, "force='yes'"),
    _no("unmerge", "a plain Keras model",
        lambda tmp: keras_qlora.unmerge(_float_model()), TypeError,
        _NOT_QLORA, "unmerge", "Sequential"),
    # summary / report.collect
    _no("summary", "a plain Keras model",
        lambda tmp: keras_qlora.summary(_float_model(), print_fn=None),
        TypeError, _NOT_QLORA, "summary", "Sequential"),
    _no("summary", "print_fn not callable",
        lambda tmp: keras_qlora.summary(_apply(), print_fn="stdout"),
        TypeError, "print_fn must be a callable or None",
        "print_fn='stdout'"),
    _no("summary", "after a float merge",
        _after_float_merge(keras_qlora.summary, print_fn=None), RuntimeError,
        "was merged into the plain model", "float_model"),
    _no("report.collect", "a string",
        _call(keras_qlora.report.collect, "model"), TypeError, _NOT_QLORA,
        "str"),
    # from_preset: cheap argument mistakes
    _no("from_preset", "model_class keras.Model",
        _from_preset(lambda: keras.Model, "/nonexistent"), TypeError,
        "keras_hub Backbone or Task class", "keras.src.models.model.Model"),
    _no("from_preset", "model_class a string",
        _from_preset(lambda: "LlamaBackbone", "/nonexistent"), TypeError,
        "keras_hub Backbone or Task class", "'LlamaBackbone'"),
    _no("from_preset", "model_class an instance",
        _from_preset(_llama_instance, "/nonexistent"), TypeError,
        "keras_hub Backbone or Task class", "LlamaBackbone"),
    _no("from_preset", "preset not a path", _from_preset(_llama, 7),
        TypeError, "preset must be the path", "preset=7"),
    _no("from_preset", "missing folder",
        _from_preset(_llama, lambda tmp: tmp / "nope"), ValueError,
        "does not exist", "{tmp}/nope"),
    _no("from_preset", "preset a file", _from_preset(_llama, _a_file),
        ValueError, "not a directory", "{tmp}/config.json"),
    _no("from_preset", "unknown apply() keyword",
        _from_preset(_llama, lambda tmp: tmp, ranks=8), TypeError,
        r"'ranks'.*apply\(\) takes: rank"),
    _no("from_preset", "bad apply() setting",
        _from_preset(_llama, lambda tmp: tmp, block_size=48), ValueError,
        _BLOCKS, "block_size=48"),
    _no("from_preset", "model_kwargs a list",
        _from_preset(_llama, _preset, model_kwargs=["dtype"]), TypeError,
        "model_kwargs must be a dict", "model_kwargs=['dtype']"),
]  # fmt: skip
