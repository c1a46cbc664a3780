"""Catalog cases (see catalog.py): the base formats (`quant_type`).

Unknown formats wherever one is named (apply, from_preset, the settings,
a layer, the quantizers), int8 states and op inputs that do not fit the
format, on both paths of `nf4_matmul`, and bad bitsandbytes int8
(`Linear8bitLt`) entries.
"""

import keras_hub
import numpy as np

import keras_qlora
from keras_qlora.quantizers import NF4State
from keras_qlora.settings import QLoRASettings

from ._training_support import _float_model
from .catalog import Case
from .catalog import Refused

_BAD_TYPES = [
    ("unknown", "int4", ValueError, "quant_type='int4'"),
    ("upper case", "NF4", ValueError, "quant_type='NF4'"),
    ("an int", 8, TypeError, "quant_type=8"),
    ("None", None, TypeError, "quant_type=None"),
]
_ONE_OF = r"quant_type must be one of \('nf4', 'fp4', 'int8'\)"


def _int8_state():
    from keras_qlora.quantizers import quantize_int8

    kernel = np.random.default_rng(0).normal(size=(70, 6)).astype("f4")
    return quantize_int8(kernel)


def _int8_weight(**changes):
    import dataclasses

    from keras_qlora.ops import NF4Tensors

    return dataclasses.replace(NF4Tensors.from_state(_int8_state()), **changes)


def _matmul(pure, weight):
    from keras_qlora import ops

    x = np.ones((2, 70), "float32")
    if pure:
        with ops.reference_path():
            return ops.nf4_matmul(x, weight)
    return ops.nf4_matmul(x, weight)


def _bnb_int8(edit):
    from keras_qlora.interop import from_bitsandbytes
    from keras_qlora.interop import to_bitsandbytes

    sd = to_bitsandbytes(_int8_state(), "fc.weight")
    edit(sd)
    return from_bitsandbytes(sd, "fc.weight")


CASES = []
for name, value, error, shown in _BAD_TYPES:
    CASES += [
        Case(
            "apply",
            f"quant_type {name}",
            lambda tmp, v=value: keras_qlora.apply(
                _float_model(), quant_type=v, verbose=False
            ),
            Refused(error, _ONE_OF, names=(shown,)),
        ),
        Case(
            "QLoRASettings",
            f"quant_type {name}",
            lambda tmp, v=value: QLoRASettings(quant_type=v),
            Refused(error, _ONE_OF, names=(shown,)),
        ),
        Case(
            "QLoRADense",
            f"quant_type {name}",
            lambda tmp, v=value: keras_qlora.QLoRADense(
                4, quant_type=v, name="proj"
            ),
            Refused(error, _ONE_OF, names=("Layer 'proj'", shown)),
        ),
        Case(
            "quantizers.quantize",
            f"quant_type {name}",
            lambda tmp, v=value: keras_qlora.quantizers.quantize(
                np.ones((4, 4), "f4"), v
            ),
            Refused(error, _ONE_OF, names=(shown,)),
        ),
    ]

CASES += [
    Case(
        "from_preset",
        "quant_type unknown (refused before the preset is read)",
        lambda tmp: keras_qlora.from_preset(
            keras_hub.models.LlamaBackbone, str(tmp), quant_type="int4"
        ),
        Refused(ValueError, _ONE_OF, names=("quant_type='int4'",)),
    ),
    Case(
        "NF4State",
        "int8 with block_size other than K",
        lambda tmp: NF4State(
            packed=np.zeros(12, np.uint8),
            absmax=np.ones(3, np.float32),
            shape=(4, 3),
            block_size=64,
            quant_type="int8",
        ),
        Refused(ValueError, r"block_size must be 4", names=("block_size=64",)),
    ),
    Case(
        "NF4State",
        "int8 with double-quantized scales",
        lambda tmp: NF4State(
            packed=np.zeros(12, np.uint8),
            absmax=np.ones(3, np.uint8),
            shape=(4, 3),
            block_size=4,
            absmax_scale=np.ones(1, np.float32),
            absmax_offset=0.0,
            quant_type="int8",
        ),
        Refused(ValueError, r"no double quantization", names=("int8",)),
    ),
    Case(
        "NF4State",
        "int8 with 4-bit packed size",
        lambda tmp: NF4State(
            packed=np.zeros(6, np.uint8),
            absmax=np.ones(3, np.float32),
            shape=(4, 3),
            block_size=4,
            quant_type="int8",
        ),
        Refused(ValueError, r"packed must have", names=("(12,)",)),
    ),
    Case(
        "to_bitsandbytes",
        "int8 prefix not ending in weight",
        lambda tmp: keras_qlora.interop.to_bitsandbytes(
            _int8_state(), "fc.kernel"
        ),
        Refused(ValueError, r"ending in 'weight'", names=("fc.kernel",)),
    ),
]

for pure in (False, True):
    path = "pure" if pure else "fused"
    CASES += [
        Case(
            "nf4_matmul",
            f"int8 weight with block_size != k ({path})",
            lambda tmp, p=pure: _matmul(p, _int8_weight(block_size=64)),
            Refused(
                ValueError,
                r"block_size must equal k=70",
                names=("quant_type=int8", "block_size=64"),
            ),
        ),
        Case(
            "nf4_matmul",
            f"int8 weight with a 4-bit packed size ({path})",
            lambda tmp, p=pure: _matmul(
                p, _int8_weight(packed=np.zeros(210, np.uint8))
            ),
            Refused(ValueError, r"packed must be 1-D", names=("k * n = 420",)),
        ),
        Case(
            "nf4_matmul",
            f"int8 weight with uint8 absmax ({path})",
            lambda tmp, p=pure: _matmul(
                p, _int8_weight(absmax=np.ones(6, np.uint8))
            ),
            Refused(
                ValueError, r"no double quantization", names=("int8", "absmax")
            ),
        ),
        Case(
            "nf4_matmul",
            f"unknown quant_type ({path})",
            lambda tmp, p=pure: _matmul(p, _int8_weight(quant_type="int4")),
            Refused(ValueError, _ONE_OF, names=("quant_type='int4'",)),
        ),
    ]


def _set(key, value):
    def edit(sd):
        sd[key] = value

    return edit


def _drop(key):
    return lambda sd: sd.pop(key)


CASES += [
    Case(
        "from_bitsandbytes",
        f"int8: {name}",
        lambda tmp, e=edit: _bnb_int8(e),
        Refused(ValueError, match, names=names),
    )
    for name, edit, match, names in [
        ("SCB missing", _drop("fc.SCB"), r"needs its scales", ("fc.SCB",)),
        (
            "SCB of the wrong length",
            _set("fc.SCB", np.ones(5, np.float32)),
            r"must be float32 with shape \[6\]",
            ("fc.SCB",),
        ),
        (
            "SCB float16",
            _set("fc.SCB", np.ones(6, np.float16)),
            r"must be float32",
            ("fc.SCB", "float16"),
        ),
        (
            "SCB with NaN",
            _set("fc.SCB", np.array([1, np.nan, 1, 1, 1, 1], np.float32)),
            r"must be finite",
            ("fc.SCB",),
        ),
        (
            "SCB negative",
            _set("fc.SCB", -np.ones(6, np.float32)),
            r"negative scales",
            ("fc.SCB",),
        ),
        (
            "weight_format not row-major",
            _set("fc.weight_format", np.array(1, np.uint8)),
            r"must be 0 \(row-major\)",
            ("fc.weight_format",),
        ),
        (
            "weight 1-D",
            _set("fc.weight", np.zeros(420, np.int8)),
            r"must be a 2-D int8",
            ("fc.weight",),
        ),
    ]
]
