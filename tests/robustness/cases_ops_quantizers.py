"""Catalog cases (see catalog.py): the quantizers and the NF4 state.

`quantize_nf4` and `quantize_nf4_fused` (each case once per entry point),
`dequantize_nf4`, `NF4State` and `NF4Tensors`.
"""

import numpy as np

from ._ops_support import K
from ._ops_support import N
from ._ops_support import _expected
from ._ops_support import _kernel
from ._ops_support import _state
from ._ops_support import _weight
from ._ops_support import _with
from ._ops_support import _x
from .catalog import Case
from .catalog import Correct
from .catalog import Refused

# -------------------------------------------------- NF4State, NF4Tensors


def _nf4_state(**fields):
    from keras_qlora import NF4State

    good = _state()
    values = dict(
        packed=good.packed,
        absmax=good.absmax,
        shape=good.shape,
        block_size=good.block_size,
        absmax_scale=good.absmax_scale,
        absmax_offset=good.absmax_offset,
    )
    values.update(fields)
    return NF4State(**values)


def _nf4_state_float(**fields):
    good = _state(False)
    return _nf4_state(
        **{
            "absmax": good.absmax,
            "absmax_scale": None,
            "absmax_offset": None,
            **fields,
        }
    )


def _state_specs():
    return [
        (
            "packed a list",
            lambda: _nf4_state(packed=[0] * (K * N // 2)),
            Refused(TypeError, r"packed must be a numpy array", ("list",)),
        ),
        (
            "packed of dtype int8",
            lambda: _nf4_state(packed=np.zeros(K * N // 2, "int8")),
            Refused(ValueError, r"packed must have dtype uint8", ("int8",)),
        ),
        (
            "packed one byte short",
            lambda: _nf4_state(packed=np.zeros(K * N // 2 - 1, "uint8")),
            Refused(ValueError, r"packed must have dtype", ("(1023,)",)),
        ),
        (
            "shape with a zero",
            lambda: _nf4_state(shape=(0, N)),
            Refused(ValueError, r"two positive sizes", ("(0, 32)",)),
        ),
        (
            "shape of one size",
            lambda: _nf4_state(shape=(K * N,)),
            Refused(ValueError, r"two positive sizes", ("(2048,)",)),
        ),
        (
            "shape with a fraction",
            lambda: _nf4_state(shape=(64.5, N)),
            Refused(TypeError, r"shape must be two", ("64.5",)),
        ),
        (
            "shape None",
            lambda: _nf4_state(shape=None),
            Refused(TypeError, r"shape must be two", ("None",)),
        ),
        (
            "block_size True",
            lambda: _nf4_state(block_size=True),
            Refused(TypeError, r"block_size must be one of", ("True",)),
        ),
        (
            "absmax_scale without absmax_offset",
            lambda: _nf4_state(absmax_offset=None),
            Refused(ValueError, r"needs both absmax_scale and absmax_offset"),
        ),
        (
            "absmax_offset NaN",
            lambda: _nf4_state(absmax_offset=float("nan")),
            Refused(ValueError, r"absmax_offset holds 1 NaN or Inf"),
        ),
        (
            "absmax_offset beyond float32",
            lambda: _nf4_state(absmax_offset=1e39),
            Refused(ValueError, r"absmax_offset holds 1 NaN or Inf"),
        ),
        (
            "absmax_offset a string",
            lambda: _nf4_state(absmax_offset="0.1"),
            Refused(TypeError, r"absmax_offset must be a number", ("'0.1'",)),
        ),
        (
            "Inf in absmax_scale",
            lambda: _nf4_state(absmax_scale=np.full(1, np.inf, "float32")),
            Refused(ValueError, r"absmax_scale holds 1 NaN or Inf"),
        ),
        (
            "NaN in a float absmax",
            lambda: _nf4_state_float(
                absmax=np.where(np.arange(32) == 3, np.nan, 1.0).astype(
                    "float32"
                )
            ),
            Refused(ValueError, r"absmax holds 1 NaN or Inf"),
        ),
        (
            "from_dict of a list",
            lambda: __import__("keras_qlora").NF4State.from_dict([1, 2]),
            Refused(TypeError, r"from_dict expects a dict", ("list",)),
        ),
        (
            "from_dict without packed",
            lambda: __import__("keras_qlora").NF4State.from_dict(
                {k: v for k, v in _state().to_dict().items() if k != "packed"}
            ),
            Refused(ValueError, r"missing keys \['packed'\]"),
        ),
    ]


def _tensors_from_dict():
    from keras_qlora.ops import NF4Tensors

    return NF4Tensors.from_state(_state().to_dict())


def _tensors_bad_shape():
    from keras_qlora.ops import nf4_matmul

    return nf4_matmul(_x(), _weight(shape=(K, N, 1)))


def _tensors_float_shape():
    from keras_qlora.ops import nf4_matmul

    return nf4_matmul(_x(), _weight(shape=(64.0, N)))


def _tensors_numpy_ints():
    """numpy integers for shape and block size are legitimate."""
    from keras_qlora.ops import nf4_matmul

    weight = _weight(shape=(np.int64(K), np.int32(N)), block_size=np.int64(64))
    y = np.asarray(nf4_matmul(_x(), weight))
    np.testing.assert_allclose(
        y, _expected(_x(), _state()), rtol=1e-4, atol=1e-4
    )


def _tensors_specs():
    return [
        (
            "from_state of a dict",
            _tensors_from_dict,
            Refused(TypeError, r"from_state expects an NF4State", ("dict",)),
        ),
        (
            "shape of three sizes",
            _tensors_bad_shape,
            Refused(ValueError, r"weight.shape", ("(64, 32, 1)",)),
        ),
        (
            "shape with a float",
            _tensors_float_shape,
            Refused(ValueError, r"weight.shape", ("64.0",)),
        ),
        ("numpy ints for shape and block_size", _tensors_numpy_ints, Correct()),
    ]


# ------------------------------------------------------------ quantizers


def _quantizer(name):
    if name == "quantize_nf4_fused":
        from keras_qlora.ops.quantize import quantize_nf4_fused

        return quantize_nf4_fused
    import keras_qlora

    return getattr(keras_qlora, name)


def _quantize_specs():
    """(name, run(quantize), expect): each for quantize_nf4 and
    quantize_nf4_fused (the same checks, the same messages)."""
    return [
        (
            "int32 kernel",
            lambda q: q(np.ones((K, N), "int32")),
            Refused(TypeError, r"floating-point kernel", ("int32",)),
        ),
        (
            "1-D kernel",
            lambda q: q(_kernel((K,))),
            Refused(ValueError, r"non-empty 2-D kernel", ("(64,)",)),
        ),
        (
            "empty kernel",
            lambda q: q(np.zeros((0, N), "float32")),
            Refused(ValueError, r"non-empty 2-D kernel", ("(0, 32)",)),
        ),
        (
            "NaN in the kernel",
            lambda q: q(_with(np.nan)),
            Refused(ValueError, r"1 non-finite values \(NaN or Inf\)"),
        ),
        (
            "-Inf in the kernel",
            lambda q: q(_with(-np.inf)),
            Refused(ValueError, r"1 non-finite values \(NaN or Inf\)"),
        ),
        (
            "block_size 48",
            lambda q: q(_kernel(), block_size=48),
            Refused(ValueError, r"block_size must be one of", ("=48",)),
        ),
        (
            "block_size a string",
            lambda q: q(_kernel(), block_size="64"),
            Refused(TypeError, r"block_size must be one of", ("'64'",)),
        ),
        (
            "double_quant a string",
            lambda q: q(_kernel(), double_quant="no"),
            Refused(TypeError, r"double_quant must be a bool", ("'no'",)),
        ),
        (
            "scale_search None",
            lambda q: q(_kernel(), scale_search=None),
            Refused(TypeError, r"scale_search must be a bool", ("None",)),
        ),
    ]


def _dequantize_specs():
    return [
        (
            "the state's dict",
            lambda: _quantizer("dequantize_nf4")(_state().to_dict()),
            Refused(TypeError, r"expects an NF4State", ("dict",)),
        ),
        (
            "an NF4Tensors",
            lambda: _quantizer("dequantize_nf4")(_weight()),
            Refused(TypeError, r"expects an NF4State", ("NF4Tensors",)),
        ),
    ]


def _quantizer_cases():
    cases = []
    for name, run, expect in _quantize_specs():
        for entry in ("quantize_nf4", "quantize_nf4_fused"):
            cases.append(
                Case(
                    entry,
                    name,
                    lambda tmp, run=run, entry=entry: run(_quantizer(entry)),
                    expect,
                )
            )
    for entry, specs in (
        ("dequantize_nf4", _dequantize_specs()),
        ("NF4State", _state_specs()),
        ("NF4Tensors", _tensors_specs()),
    ):
        for name, run, expect in specs:
            cases.append(Case(entry, name, lambda tmp, run=run: run(), expect))
    return cases


CASES = _quantizer_cases()
