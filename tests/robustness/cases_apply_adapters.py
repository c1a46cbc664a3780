"""Catalog cases (see catalog.py) for what acts on `apply()`'s result: named
adapters, merge / unmerge, `summary` / `report.collect`, and
`from_preset`'s cheap argument mistakes (its files are covered by
tests/loading/test_preset_errors.py).
"""

import functools
import pathlib
import tempfile
import warnings

import keras
import numpy as np

import keras_qlora

from ._apply_support import _BLOCKS
from ._apply_support import _BOOL
from ._apply_support import _apply
from ._apply_support import _call
from ._apply_support import _float_model
from ._apply_support import _no
from ._apply_support import _ok

X = np.ones((2, 32), "float32")


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


_NOT_QLORA = r"expects the model returned by keras_qlora.apply\(\)"


CASES = [
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
