"""Catalog cases (see catalog.py): bitsandbytes state dicts,
`from_bitsandbytes`, `to_bitsandbytes` and their `_model` forms.

Missing or inconsistent quantization metadata, wrong shapes and dtypes,
and (where torch and bitsandbytes are installed) real bitsandbytes
tensors.
"""

import json
import math

import numpy as np

from ._files_support import _float_model
from ._files_support import _model
from ._files_support import _refused_unchanged
from .catalog import Case
from .catalog import Correct
from .catalog import Refused

# -- bitsandbytes -------------------------------------------------------------

BNB_META = "weight.quant_state.bitsandbytes__nf4"


def _bnb_sd(double_quant=True):
    from keras_qlora.interop import to_bitsandbytes
    from keras_qlora.quantizers import quantize_nf4

    kernel = np.random.default_rng(0).normal(size=(16, 8)).astype("f4")
    return to_bitsandbytes(quantize_nf4(kernel, double_quant=double_quant))


def _from_bnb(edit=None, double_quant=True, prefix="weight"):
    from keras_qlora.interop import from_bitsandbytes

    sd = _bnb_sd(double_quant)
    if edit:
        edit(sd)
    return from_bitsandbytes(sd, prefix=prefix)


def _meta(edit=None, raw=None):
    """Edits the JSON of the quant_state entry (or replaces its bytes)."""

    def apply(sd):
        data = raw
        if data is None:
            meta = json.loads(sd[BNB_META].tobytes())
            edit(meta)
            data = json.dumps(meta).encode()
        sd[BNB_META] = np.frombuffer(data, np.uint8).copy()

    return apply


def _entry(key, value):
    return lambda sd: sd.update({key: value})


def _torch_bf16_absmax(sd):
    import torch

    sd["weight.absmax"] = torch.zeros(4, dtype=torch.bfloat16)


def _torch_round_trip(tmp):
    import torch

    from keras_qlora.interop import from_bitsandbytes
    from keras_qlora.quantizers import dequantize_nf4

    sd = _bnb_sd()
    back = from_bitsandbytes({k: torch.from_numpy(v) for k, v in sd.items()})
    np.testing.assert_array_equal(
        dequantize_nf4(back), dequantize_nf4(_from_bnb())
    )


def _real_bnb(quant_type="nf4", double_quant=True, blocksize=64):
    """A state bitsandbytes wrote; read, it holds the bytes our quantizer
    gives (bitsandbytes' CPU dequantize_4bit is not the oracle: in 0.50
    it does not invert its own CPU quantize_4bit)."""
    import bitsandbytes.functional as bnbf
    import torch

    from keras_qlora.interop import from_bitsandbytes
    from keras_qlora.quantizers import quantize

    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    packed, state = bnbf.quantize_4bit(
        weight,
        blocksize=blocksize,
        quant_type=quant_type,
        compress_statistics=double_quant,
    )
    sd = {"w": packed}
    sd.update({f"w.{k}": v for k, v in state.as_dict(packed=True).items()})
    ours = from_bitsandbytes(sd, prefix="w")
    kernel = weight.numpy().T
    want = quantize(
        kernel, quant_type, blocksize, double_quant, scale_search=False
    )
    assert ours.quant_type == quant_type
    np.testing.assert_array_equal(ours.packed, want.packed)
    np.testing.assert_allclose(
        ours.block_absmax(), want.block_absmax(), rtol=1e-2
    )


BNB = ("torch", "bitsandbytes")
BNB_CASES = [
    Case(
        "from_bitsandbytes",
        "a list, not a mapping",
        lambda tmp: _from_bnb_value([1, 2]),
        Refused(TypeError, r"expects a state_dict mapping", names=("list",)),
    ),
    Case(
        "from_bitsandbytes",
        "no quant_state entry",
        lambda tmp: _from_bnb(lambda sd: sd.pop(BNB_META)),
        Refused(ValueError, r"needs exactly one key", names=(BNB_META,)),
    ),
    Case(
        "from_bitsandbytes",
        "quant_state not UTF-8 JSON",
        lambda tmp: _from_bnb(_meta(raw=b"\xff\x00{")),
        Refused(ValueError, r"bytes of a UTF-8 JSON dict", names=(BNB_META,)),
    ),
    Case(
        "from_bitsandbytes",
        "quant_state nested 100000 deep",
        lambda tmp: _from_bnb(_meta(raw=b"[" * 100_000 + b"]" * 100_000)),
        Refused(ValueError, r"bytes of a UTF-8 JSON dict", names=(BNB_META,)),
    ),
    Case(
        "from_bitsandbytes",
        "quant_state a JSON list",
        lambda tmp: _from_bnb(_meta(raw=b"[64]")),
        Refused(ValueError, r"must decode to a JSON dict", names=(BNB_META,)),
    ),
    Case(
        "from_bitsandbytes",
        "quant_state without blocksize",
        lambda tmp: _from_bnb(_meta(lambda m: m.pop("blocksize"))),
        Refused(ValueError, r"lacks fields \['blocksize'\]"),
    ),
    Case(
        "from_bitsandbytes",
        "blocksize 4096",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(blocksize=4096))),
        Refused(ValueError, r"'blocksize'.*must be one of", names=("4096",)),
    ),
    Case(
        "from_bitsandbytes",
        "blocksize 64.0",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(blocksize=64.0))),
        Refused(ValueError, r"'blocksize'.*must be one of", names=("64.0",)),
    ),
    Case(
        "from_bitsandbytes",
        "shape of one dimension",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(shape=[128]))),
        Refused(ValueError, r"'shape'.*two positive ints", names=("[128]",)),
    ),
    Case(
        "from_bitsandbytes",
        "negative shape",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(shape=[-8, -16]))),
        Refused(ValueError, r"'shape'.*two positive ints"),
    ),
    Case(
        "from_bitsandbytes",
        "shape that does not fit the bytes",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(shape=[16, 16]))),
        Refused(ValueError, r"must hold ceil\(N \* K / 2\) = 128 bytes"),
    ),
    Case(
        "from_bitsandbytes",
        "dtype float64",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(dtype="float64"))),
        Refused(ValueError, r"'dtype'.*must be one of", names=("float64",)),
    ),
    Case(
        "from_bitsandbytes",
        "fp4 key over nf4 metadata",
        lambda tmp: _from_bnb(
            lambda sd: sd.update(
                {BNB_META.replace("nf4", "fp4"): sd.pop(BNB_META)}
            )
        ),
        Refused(
            ValueError,
            r"'quant_type'.*must be one of \('fp4',\)",
            names=("quant_type='nf4'",),
        ),
    ),
    Case(
        "from_bitsandbytes",
        "nested_offset beyond float32",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(nested_offset=1e39))),
        Refused(
            ValueError, r"'nested_offset'.*finite in float32", names=("1e+39",)
        ),
    ),
    Case(
        "from_bitsandbytes",
        "nested_offset NaN",
        lambda tmp: _from_bnb(
            _meta(lambda m: m.update(nested_offset=math.nan))
        ),
        Refused(
            ValueError, r"'nested_offset'.*finite in float32", names=("nan",)
        ),
    ),
    Case(
        "from_bitsandbytes",
        "nested_offset a string",
        lambda tmp: _from_bnb(_meta(lambda m: m.update(nested_offset="0.1"))),
        Refused(ValueError, r"'nested_offset'.*must be a number"),
    ),
    Case(
        "from_bitsandbytes",
        "nested_absmax missing",
        lambda tmp: _from_bnb(lambda sd: sd.pop("weight.nested_absmax")),
        Refused(ValueError, r"double-quantized weight needs keys"),
    ),
    Case(
        "from_bitsandbytes",
        "nested_absmax NaN",
        lambda tmp: _from_bnb(
            _entry("weight.nested_absmax", np.full(1, np.nan, "f4"))
        ),
        Refused(ValueError, r"must be finite", names=("weight.nested_absmax",)),
    ),
    Case(
        "from_bitsandbytes",
        "absmax Inf (no double quant)",
        lambda tmp: _from_bnb(
            _entry("weight.absmax", np.full(2, np.inf, "f4")),
            double_quant=False,
        ),
        Refused(ValueError, r"must be finite", names=("weight.absmax",)),
    ),
    Case(
        "from_bitsandbytes",
        "absmax float16",
        lambda tmp: _from_bnb(_entry("weight.absmax", np.zeros(2, "f2"))),
        Refused(
            ValueError, r"must be uint8 with shape \[2\]", names=("float16",)
        ),
    ),
    Case(
        "from_bitsandbytes",
        "packed weight float32",
        lambda tmp: _from_bnb(_entry("weight", np.zeros((64, 1), "f4"))),
        Refused(ValueError, r"'weight' must be uint8", names=("float32",)),
    ),
    Case(
        "from_bitsandbytes",
        "quant_map not NF4",
        lambda tmp: _from_bnb(_entry("weight.quant_map", np.zeros(16, "f4"))),
        Refused(ValueError, r"NF4 code table", names=("weight.quant_map",)),
    ),
    Case(
        "from_bitsandbytes",
        "an entry of Python objects",
        lambda tmp: _from_bnb(_entry("weight.absmax", [object(), object()])),
        Refused(TypeError, r"must be an array", names=("weight.absmax",)),
    ),
    Case(
        "from_bitsandbytes",
        "empty prefix",
        lambda tmp: _from_bnb(prefix=""),
        Refused(ValueError, r"prefix must be the non-empty key"),
    ),
    Case(
        "from_bitsandbytes",
        "prefix of the wrong type",
        lambda tmp: _from_bnb(prefix=5),
        Refused(TypeError, r"prefix must be", names=("prefix=5",)),
    ),
    Case(
        "from_bitsandbytes",
        "a prefix the state dict lacks",
        lambda tmp: _from_bnb(prefix="model.fc.weight"),
        Refused(
            ValueError, r"needs exactly one key", names=("model.fc.weight",)
        ),
    ),
    Case(
        "from_bitsandbytes",
        "torch bfloat16 absmax",
        lambda tmp: _from_bnb(_torch_bf16_absmax),
        Refused(TypeError, r"cannot read", names=("weight.absmax",)),
        needs=("torch",),
    ),
    Case(
        "from_bitsandbytes",
        "torch tensors",
        _torch_round_trip,
        Correct(),
        needs=("torch",),
    ),
    Case(
        "from_bitsandbytes",
        "bitsandbytes' own nf4 state",
        lambda tmp: _real_bnb(),
        Correct(),
        isolate=True,
        needs=BNB,
    ),
    Case(
        "from_bitsandbytes",
        "bitsandbytes' own state, no double quant",
        lambda tmp: _real_bnb(double_quant=False),
        Correct(),
        isolate=True,
        needs=BNB,
    ),
    Case(
        "from_bitsandbytes",
        "bitsandbytes' fp4 state",
        lambda tmp: _real_bnb(quant_type="fp4"),
        Correct(),
        isolate=True,
        needs=BNB,
    ),
    Case(
        "from_bitsandbytes",
        "bitsandbytes' blocksize 4096",
        lambda tmp: _real_bnb(blocksize=4096),
        Refused(ValueError, r"'blocksize'.*must be one of", names=("4096",)),
        isolate=True,
        needs=BNB,
    ),
    Case(
        "to_bitsandbytes",
        "a float kernel, not a state",
        lambda tmp: _to_bnb(np.zeros((16, 8), "f4")),
        Refused(TypeError, r"expects an NF4State", names=("ndarray",)),
    ),
    Case(
        "to_bitsandbytes",
        "prefix None",
        lambda tmp: _to_bnb(_from_bnb(), prefix=None),
        Refused(TypeError, r"prefix must be", names=("prefix=None",)),
    ),
    Case(
        "to_bitsandbytes_model",
        "a plain Keras model",
        lambda tmp: _to_bnb_model(_float_model()),
        Refused(TypeError, r"expects the model returned by .*apply"),
    ),
    Case(
        "to_bitsandbytes_model",
        "unknown naming",
        lambda tmp: _to_bnb_model(_model(), naming="hf-nope"),
        Refused(ValueError, r"naming", names=("hf-nope",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "a plain Keras model",
        lambda tmp: _from_bnb_model(_float_model()),
        Refused(TypeError, r"expects the model returned by .*apply"),
    ),
    Case(
        "from_bitsandbytes_model",
        "a list, not a mapping",
        lambda tmp: _from_bnb_model(_model(), lambda sd: list(sd)),
        Refused(TypeError, r"expects a state_dict mapping", names=("list",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "another block size",
        lambda tmp: _from_bnb_model(_model(), source=_model(block_size=32)),
        Refused(ValueError, r"block size 32.*uses 64", names=("query",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "a weight of another shape",
        lambda tmp: _from_bnb_model(_model(), _swap_weight),
        Refused(ValueError, r"holds a weight \[out, in\]", names=("query",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "a module missing",
        lambda tmp: _from_bnb_model(_model(), _drop("query.weight")),
        Refused(ValueError, r"lacks 1 key", names=("query.weight",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "an unused key (strict)",
        lambda tmp: _from_bnb_model(
            _model(), lambda sd: dict(sd, extra=np.zeros(2, "f4"))
        ),
        Refused(ValueError, r"match no QLoRA layer", names=("extra",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "a stray 4-bit weight (strict=False)",
        lambda tmp: _from_bnb_model(_model(), _stray_weight, strict=False),
        Refused(ValueError, r"match no QLoRA layer", names=("other.weight",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "NaN bias",
        lambda tmp: _from_bnb_model(_model(), _nan_bias),
        Refused(ValueError, r"holds NaN or Inf", names=("query.bias",)),
    ),
    Case(
        "from_bitsandbytes_model",
        "corrupt quant_state of one module",
        lambda tmp: _from_bnb_model(_model(), _corrupt_head),
        Refused(ValueError, r"UTF-8 JSON", names=("head.weight",)),
    ),
]


def _from_bnb_value(value):
    from keras_qlora.interop import from_bitsandbytes

    return from_bitsandbytes(value)


def _to_bnb(value, **kw):
    from keras_qlora.interop import to_bitsandbytes

    return to_bitsandbytes(value, **kw)


def _to_bnb_model(model, **kw):
    from keras_qlora.interop import to_bitsandbytes_model

    return to_bitsandbytes_model(model, **kw)


def _from_bnb_model(model, edit=None, source=None, **kw):
    """Loads a state dict of `source` (a model like `model`), edited, into
    `model`, which a refusal leaves unchanged."""
    from keras_qlora.interop import from_bitsandbytes_model

    sd = _to_bnb_model(source or _model(seed=1))
    if edit:
        sd = edit(sd)
    _refused_unchanged(lambda: from_bitsandbytes_model(model, sd, **kw), model)


def _drop(key):
    return lambda sd: {k: v for k, v in sd.items() if not k.startswith(key)}


def _swap_weight(sd):
    # The head's entries under the query's name: [4, 8] instead of [8, 16].
    out = dict(sd)
    for key in [k for k in sd if k.startswith("query.weight")]:
        out[key] = sd[key.replace("query.", "head.")]
    return out


def _stray_weight(sd):
    out = dict(sd)
    for key in [k for k in sd if k.startswith("head.weight")]:
        out[key.replace("head.", "other.")] = sd[key]
    return out


def _nan_bias(sd):
    return dict(sd, **{"query.bias": np.full(8, np.nan, "f4")})


def _corrupt_head(sd):
    key = "head.weight.quant_state.bitsandbytes__nf4"
    return dict(sd, **{key: np.frombuffer(b"\xff{", np.uint8)})


CASES = BNB_CASES
