"""Catalog cases (see catalog.py) for `apply()` itself and `QLoRASettings`.

The model argument and its layers, bad settings, options and selectors,
and selectors and options that must work. Every refused `apply()` also
checks that the model was left as it was (everything is checked before the
first layer changes).
"""

import dataclasses
import re

import keras
import numpy as np

import keras_qlora
from keras_qlora.layers import QLoRALayerBase

from ._apply_support import _BLOCKS
from ._apply_support import _BOOL
from ._apply_support import Settings
from ._apply_support import _apply
from ._apply_support import _call
from ._apply_support import _dense
from ._apply_support import _float_model
from ._apply_support import _no
from ._apply_support import _ok


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


_SELECTOR = r"a module selector must be a list of names"
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
]  # fmt: skip
