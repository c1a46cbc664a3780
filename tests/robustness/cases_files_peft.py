"""Catalog cases (see catalog.py): PEFT adapters, `load_peft_adapter`,
`save_peft_adapter` and `apply_peft_adapter`.

Bad `adapter_config.json` fields, missing, extra or misnamed tensors, and
failed writes that must leave the previous good files byte-identical
(`files_kept`).
"""

import math
import shutil

import numpy as np

from ._files_support import ADAPTER_CFG
from ._files_support import ADAPTER_W
from ._files_support import _edit_config
from ._files_support import _float_model
from ._files_support import _kept_file
from ._files_support import _lora
from ._files_support import _model
from ._files_support import _poison
from ._files_support import _randomize
from ._files_support import _raw_safetensors
from ._files_support import _refused_unchanged
from ._files_support import _setf
from ._files_support import _unchanged
from ._files_support import _values
from .catalog import Case
from .catalog import Correct
from .catalog import Refused
from .catalog import files_kept

# -- PEFT adapters ------------------------------------------------------------

PEFT_A = "base_model.model.query.lora_A.weight"
PEFT_B = "base_model.model.query.lora_B.weight"


def _peft(tmp, model=None):
    from keras_qlora.interop import save_peft_adapter

    model = model or _model()
    _randomize(model)
    path = tmp / "peft"
    save_peft_adapter(model, path, naming=None)
    return model, path


def _peft_config(edit):
    return lambda path: _edit_config(path, edit)


def _peft_tensors(edit):
    def apply(path):
        import safetensors.numpy

        tensors = safetensors.numpy.load((path / ADAPTER_W).read_bytes())
        edit(tensors)
        (path / ADAPTER_W).write_bytes(safetensors.numpy.save(tensors))

    return apply


def _peft_load(tmp, edit=None, naming=None, **kw):
    from keras_qlora.interop import load_peft_adapter

    _, path = _peft(tmp)
    if edit:
        edit(path)
    model = _model(**kw)
    _refused_unchanged(
        lambda: load_peft_adapter(model, path, naming=naming), model
    )


def _peft_save_kept(tmp, prepare=None, **kw):
    from keras_qlora.interop import save_peft_adapter

    model, path = _peft(tmp)
    if prepare:
        prepare(model)
    with files_kept(tmp):
        save_peft_adapter(model, path, naming=None, **kw)


def _peft_apply(tmp, edit=None, **kw):
    """apply_peft_adapter on a float model, which a refusal leaves as it
    was (still float, same weights)."""
    import keras

    from keras_qlora.interop import apply_peft_adapter

    _, path = _peft(tmp)
    if edit:
        edit(path)
    model = _float_model()
    before = _values(model)
    try:
        apply_peft_adapter(model, path, naming=None, **kw)
    finally:
        kinds = {type(layer) for layer in model.layers[1:]}
        assert kinds == {keras.layers.Dense}, kinds
        _unchanged(model, before)


def _rename_module(tensors):
    for key in list(tensors):
        tensors[key.replace(".query.", ".other.")] = tensors.pop(key)


def _extra_module(tensors):
    for key in list(tensors):
        tensors[key.replace(".query.", ".other.")] = tensors[key]


def _peft_bfloat16(tmp):
    import safetensors

    from keras_qlora.interop import load_peft_adapter

    model, path = _peft(tmp)
    tensors = safetensors.deserialize((path / ADAPTER_W).read_bytes())
    head, body, offset = {}, b"", 0
    for key, entry in tensors:
        value = np.frombuffer(entry["data"], "<f4")
        raw = (value.view(np.uint32) >> 16).astype("<u2").tobytes()
        head[key] = {
            "dtype": "BF16",
            "shape": entry["shape"],
            "data_offsets": [offset, offset + len(raw)],
        }
        body, offset = body + raw, offset + len(raw)
    (path / ADAPTER_W).write_bytes(_raw_safetensors(head, body))
    fresh = _model()
    load_peft_adapter(fresh, path, naming=None)
    b = _lora(model).lora_b.numpy()
    want = ((b.view(np.uint32) >> 16) << 16).view(np.float32)
    np.testing.assert_array_equal(_lora(fresh).lora_b.numpy(), want)


PEFT_CFG = ADAPTER_CFG
PEFT_CASES = [
    Case(
        "load_peft_adapter",
        "missing folder",
        lambda tmp: _peft_load_path(tmp / "nowhere"),
        Refused(
            FileNotFoundError, r"No PEFT adapter", names=("{tmp}/nowhere",)
        ),
    ),
    Case(
        "load_peft_adapter",
        "missing weights file",
        lambda tmp: _peft_load(tmp, lambda p: (p / ADAPTER_W).unlink()),
        Refused(FileNotFoundError, r"file missing", names=(ADAPTER_W,)),
    ),
    Case(
        "load_peft_adapter",
        "config is not JSON",
        lambda tmp: _peft_load(tmp, lambda p: (p / PEFT_CFG).write_text("{r:")),
        Refused(ValueError, r"is not valid JSON", names=(PEFT_CFG,)),
    ),
    Case(
        "load_peft_adapter",
        "config is a JSON list",
        lambda tmp: _peft_load(tmp, lambda p: (p / PEFT_CFG).write_text("[]")),
        Refused(ValueError, r"must hold a JSON object", names=(PEFT_CFG,)),
    ),
    Case(
        "load_peft_adapter",
        "peft_type PREFIX_TUNING",
        lambda tmp: _peft_load(
            tmp, _peft_config(_setf("peft_type", "PREFIX_TUNING"))
        ),
        Refused(ValueError, r"only LoRA", names=("peft_type", PEFT_CFG)),
    ),
    Case(
        "load_peft_adapter",
        "a DoRA adapter",
        lambda tmp: _peft_load(tmp, _peft_config(_setf("use_dora", True))),
        Refused(ValueError, r"DoRA", names=("use_dora",)),
    ),
    Case(
        "load_peft_adapter",
        "no field r",
        lambda tmp: _peft_load(tmp, _peft_config(lambda c: c.pop("r"))),
        Refused(ValueError, r"no field 'r'", names=(PEFT_CFG,)),
    ),
    Case(
        "load_peft_adapter",
        "r = 0",
        lambda tmp: _peft_load(tmp, _peft_config(_setf("r", 0))),
        Refused(ValueError, r"'r' must be a positive int", names=("r=0",)),
    ),
    Case(
        "load_peft_adapter",
        "lora_alpha NaN",
        lambda tmp: _peft_load(
            tmp, _peft_config(_setf("lora_alpha", math.nan))
        ),
        Refused(ValueError, r"'lora_alpha' must be a number", names=("nan",)),
    ),
    Case(
        "load_peft_adapter",
        "lora_alpha a string",
        lambda tmp: _peft_load(tmp, _peft_config(_setf("lora_alpha", "4"))),
        Refused(ValueError, r"'lora_alpha' must be a number"),
    ),
    Case(
        "load_peft_adapter",
        "use_rslora a string",
        lambda tmp: _peft_load(tmp, _peft_config(_setf("use_rslora", "yes"))),
        Refused(ValueError, r"'use_rslora' must be true or false"),
    ),
    Case(
        "load_peft_adapter",
        "rank_pattern with a global flag",
        lambda tmp: _peft_load(
            tmp, _peft_config(_setf("rank_pattern", {"(?i)query": 2}))
        ),
        Refused(
            ValueError, r"not a valid module pattern", names=("(?i)query",)
        ),
    ),
    Case(
        "load_peft_adapter",
        "rank_pattern rank 0",
        lambda tmp: _peft_load(
            tmp, _peft_config(_setf("rank_pattern", {"query": 0}))
        ),
        Refused(ValueError, r"must map module patterns to positive ints"),
    ),
    Case(
        "load_peft_adapter",
        "target_modules a number",
        lambda tmp: _peft_load(tmp, _peft_config(_setf("target_modules", 5))),
        Refused(ValueError, r"'target_modules' must be", names=("5",)),
    ),
    Case(
        "load_peft_adapter",
        "weights truncated",
        lambda tmp: _peft_load(
            tmp,
            lambda p: (p / ADAPTER_W).write_bytes(
                (p / ADAPTER_W).read_bytes()[:60]
            ),
        ),
        Refused(ValueError, r"not a readable safetensors", names=(ADAPTER_W,)),
    ),
    Case(
        "load_peft_adapter",
        "safetensors offsets beyond the data",
        lambda tmp: _peft_load(
            tmp,
            lambda p: (p / ADAPTER_W).write_bytes(
                _raw_safetensors(
                    {
                        PEFT_A: {
                            "dtype": "F32",
                            "shape": [2, 16],
                            "data_offsets": [0, 1 << 33],
                        }
                    },
                    bytes(128),
                )
            ),
        ),
        Refused(ValueError, r"not a readable safetensors", names=(ADAPTER_W,)),
        isolate=True,
    ),
    Case(
        "load_peft_adapter",
        "a LoRA bias tensor",
        lambda tmp: _peft_load(
            tmp,
            _peft_tensors(
                lambda t: t.update(
                    {"base_model.model.query.lora_B.bias": np.zeros(8, "f4")}
                )
            ),
        ),
        Refused(ValueError, r"not LoRA A/B weights", names=("lora_B.bias",)),
    ),
    Case(
        "load_peft_adapter",
        "lora_A without lora_B",
        lambda tmp: _peft_load(tmp, _peft_tensors(lambda t: t.pop(PEFT_B))),
        Refused(ValueError, r"lora_A or lora_B but not both", names=("query",)),
    ),
    Case(
        "load_peft_adapter",
        "lora_A one-dimensional",
        lambda tmp: _peft_load(
            tmp, _peft_tensors(lambda t: t.update({PEFT_A: np.zeros(32, "f4")}))
        ),
        Refused(
            ValueError, r"must be \[r, in\] and \[out, r\]", names=("query",)
        ),
    ),
    Case(
        "load_peft_adapter",
        "lora_A of another input size",
        lambda tmp: _peft_load(
            tmp,
            _peft_tensors(
                lambda t: t.update({PEFT_A: np.zeros((2, 10), "f4")})
            ),
        ),
        Refused(ValueError, r"maps \[in=10\]", names=("query",)),
    ),
    Case(
        "load_peft_adapter",
        "config r differs from the weights' rank",
        lambda tmp: _peft_load(tmp, _peft_config(_setf("r", 4))),
        Refused(ValueError, r"rank 2 but the config gives it r=4"),
    ),
    Case(
        "load_peft_adapter",
        "lora_alpha differs from the model's",
        lambda tmp: _peft_load(tmp, _peft_config(_setf("lora_alpha", 8))),
        Refused(ValueError, r"scales B @ A.*layer 'query'"),
    ),
    Case(
        "load_peft_adapter",
        "NaN in lora_B",
        lambda tmp: _peft_load(
            tmp,
            _peft_tensors(
                lambda t: t.update({PEFT_B: np.full((8, 2), np.nan, "f4")})
            ),
        ),
        Refused(ValueError, r"lora_B has NaN or Inf", names=("query",)),
    ),
    Case(
        "load_peft_adapter",
        "int32 weights",
        lambda tmp: _peft_load(
            tmp,
            _peft_tensors(
                lambda t: t.update({PEFT_A: np.zeros((2, 16), "i4")})
            ),
        ),
        Refused(ValueError, r"has dtype I32", names=(PEFT_A,)),
    ),
    Case(
        "load_peft_adapter",
        "an extra module the model lacks",
        lambda tmp: _peft_load(tmp, _peft_tensors(_extra_module)),
        Refused(ValueError, r"does not match the model's LoRA layers.*other"),
    ),
    Case(
        "load_peft_adapter",
        "only modules the model lacks",
        lambda tmp: _peft_load(tmp, _peft_tensors(_rename_module)),
        Refused(ValueError, r"no key of the model's modules was found"),
    ),
    Case(
        "load_peft_adapter",
        "unknown naming",
        lambda tmp: _peft_load(tmp, naming="hf-nope"),
        Refused(ValueError, r"naming", names=("hf-nope",)),
    ),
    Case("load_peft_adapter", "bfloat16 weights", _peft_bfloat16, Correct()),
    Case(
        "save_peft_adapter",
        "existing adapter, overwrite=False",
        lambda tmp: _peft_save_kept(tmp),
        Refused(FileExistsError, r"overwrite=True", names=("{tmp}/peft",)),
    ),
    Case(
        "save_peft_adapter",
        "overwrite='yes' (not a bool)",
        lambda tmp: _peft_save_kept(tmp, overwrite="yes"),
        Refused(TypeError, r"overwrite must be a bool", names=("overwrite",)),
    ),
    Case(
        "save_peft_adapter",
        "NaN weights over a good adapter",
        lambda tmp: _peft_save_kept(tmp, _poison, overwrite=True),
        Refused(ValueError, r"NaN or Inf", names=("query",)),
    ),
    Case(
        "save_peft_adapter",
        "a model with modules_to_save",
        lambda tmp: _peft(tmp, _model(modules_to_save=["head"])),
        Refused(ValueError, r"modules_to_save \['head'\]"),
    ),
    Case(
        "save_peft_adapter",
        "path is a file, overwrite=True",
        lambda tmp: _kept_file(tmp, lambda p: _peft_save_to(p, overwrite=True)),
        Refused(ValueError, r"not an adapter directory", names=("{tmp}",)),
    ),
    Case(
        "apply_peft_adapter",
        "rank passed by hand",
        lambda tmp: _peft_apply(tmp, rank=4),
        Refused(TypeError, r"from the adapter's config", names=("rank",)),
    ),
    Case(
        "apply_peft_adapter",
        "missing folder",
        lambda tmp: _peft_apply(tmp, lambda p: shutil.rmtree(p)),
        Refused(FileNotFoundError, r"No PEFT adapter", names=("{tmp}/peft",)),
    ),
    Case(
        "apply_peft_adapter",
        "a module the model lacks",
        lambda tmp: _peft_apply(tmp, _peft_tensors(_extra_module)),
        Refused(ValueError, r"PEFT module 'other' .* has no linear layer"),
    ),
    Case(
        "apply_peft_adapter",
        "NaN in lora_B",
        lambda tmp: _peft_apply(
            tmp,
            _peft_tensors(
                lambda t: t.update({PEFT_B: np.full((8, 2), np.nan, "f4")})
            ),
        ),
        Refused(ValueError, r"NaN or Inf", names=("query",)),
    ),
    Case(
        "apply_peft_adapter",
        "lora_A of another input size",
        lambda tmp: _peft_apply(
            tmp,
            _peft_tensors(
                lambda t: t.update({PEFT_A: np.zeros((2, 10), "f4")})
            ),
        ),
        Refused(ValueError, r"in=10", names=("query",)),
    ),
    Case(
        "apply_peft_adapter",
        "lora_A and lora_B ranks differ",
        lambda tmp: _peft_apply(
            tmp,
            _peft_tensors(
                lambda t: t.update({PEFT_A: np.zeros((3, 16), "f4")})
            ),
        ),
        Refused(ValueError, r"\[r, in\] and \[out, r\]", names=("query",)),
    ),
]


def _peft_load_path(path):
    from keras_qlora.interop import load_peft_adapter

    load_peft_adapter(_model(), path, naming=None)


def _peft_save_to(path, **kw):
    from keras_qlora.interop import save_peft_adapter

    save_peft_adapter(_model(), path, naming=None, **kw)


CASES = PEFT_CASES
