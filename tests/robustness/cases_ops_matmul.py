"""Catalog cases (see catalog.py): `nf4_matmul` on both of its paths.

The fused C++ op and the pure TensorFlow reference, each case once per
path: bad inputs, shapes and dtypes, non-finite and empty batches.
"""

import numpy as np

from ._ops_support import K
from ._ops_support import N
from ._ops_support import _expected
from ._ops_support import _state
from ._ops_support import _weight
from ._ops_support import _x
from .catalog import Case
from .catalog import Correct
from .catalog import Refused


def _on_path(pure, call):
    """Runs `call()` on the pure path (`reference_path()`) or the fused one
    (which must really be the fused op here)."""
    from keras_qlora import ops

    if pure:
        with ops.reference_path():
            return call()
    name, reason = ops.active_path()
    assert name == "fused", f"the fused op is not available: {reason}"
    return call()


def _matmul(pure, x=None, weight=None, **kwargs):
    from keras_qlora import ops

    x = _x() if x is None else x
    weight = _weight() if weight is None else weight
    return _on_path(pure, lambda: ops.nf4_matmul(x, weight, **kwargs))


# ------------------------------------------------------------ nf4_matmul


def _non_finite_x(pure, value):
    """NaN / Inf in x is ordinary float math: the rows holding one are
    non-finite (NaN * 0 and Inf * 0 are NaN), the other rows are exact."""
    x = _x(m=3)
    x[0, 5] = value
    y = np.asarray(_matmul(pure, x=x), np.float64)
    assert y.shape == (3, N), y.shape
    assert not np.isfinite(y[0]).any(), f"row 0 should be non-finite: {y[0]}"
    np.testing.assert_allclose(
        y[1:], _expected(x[1:], _state()), rtol=1e-4, atol=1e-4
    )


def _empty_batch(pure):
    y = _matmul(pure, x=np.zeros((0, K), "float32"))
    assert tuple(y.shape) == (0, N), y.shape


def _matmul_specs():
    """(name, run(pure), expect): each becomes one case per path."""
    nan, inf = float("nan"), float("inf")
    return [
        (
            "x of rank 1",
            lambda p: _matmul(p, x=np.ones(K, "float32")),
            Refused(ValueError, r"x must have rank >= 2", ("(64,)",)),
        ),
        (
            "x of dtype int32",
            lambda p: _matmul(p, x=np.ones((2, K), "int32")),
            Refused(TypeError, r"x must have dtype in", ("x.dtype=int32",)),
        ),
        (
            "x of dtype float64",
            lambda p: _matmul(p, x=np.ones((2, K), "float64")),
            Refused(TypeError, r"x must have dtype in", ("x.dtype=float64",)),
        ),
        (
            "x one column short",
            lambda p: _matmul(p, x=np.ones((2, K - 1), "float32")),
            Refused(ValueError, r"last axis of x must be k=64", ("(2, 63)",)),
        ),
        (
            "x of width k with transpose=True",
            lambda p: _matmul(p, transpose=True),
            Refused(ValueError, r"last axis of x must be n=32", ("(2, 64)",)),
        ),
        (
            "transpose a string",
            lambda p: _matmul(p, transpose="yes"),
            Refused(TypeError, r"transpose must be a bool", ("'yes'",)),
        ),
        (
            "transpose None",
            lambda p: _matmul(p, transpose=None),
            Refused(TypeError, r"transpose must be a bool", ("None",)),
        ),
        (
            "weight a float array",
            lambda p: _matmul(p, weight=np.ones((K, N), "float32")),
            Refused(TypeError, r"NF4Tensors or an NF4State", ("ndarray",)),
        ),
        (
            "weight the state's dict",
            lambda p: _matmul(p, weight=_state().to_dict()),
            Refused(TypeError, r"NF4Tensors or an NF4State", ("dict",)),
        ),
        (
            "packed one byte short",
            lambda p: _matmul(
                p, weight=_weight(packed=np.zeros(K * N // 2 - 1, "uint8"))
            ),
            Refused(ValueError, r"packed must be 1-D with", ("(1023,)",)),
        ),
        (
            "packed of dtype float32",
            lambda p: _matmul(
                p, weight=_weight(packed=np.zeros(K * N // 2, "float32"))
            ),
            Refused(TypeError, r"packed must have dtype", ("float32",)),
        ),
        (
            "absmax of the wrong length",
            lambda p: _matmul(p, weight=_weight(absmax=np.zeros(31, "uint8"))),
            Refused(ValueError, r"absmax must be 1-D with", ("(31,)",)),
        ),
        (
            "uint8 absmax without a scale",
            lambda p: _matmul(
                p, weight=_weight(absmax_scale=None, absmax_offset=None)
            ),
            Refused(ValueError, r"absmax_scale and absmax_offset are required"),
        ),
        (
            "float absmax with a stray scale",
            lambda p: _matmul(
                p,
                weight=_weight(
                    False,
                    absmax_scale=np.ones(1, "float32"),
                    absmax_offset=np.float32(0),
                ),
            ),
            Refused(ValueError, r"takes no absmax_scale", ("float32[1]",)),
        ),
        (
            "absmax_offset a vector",
            lambda p: _matmul(
                p, weight=_weight(absmax_offset=np.zeros(1, "float32"))
            ),
            Refused(ValueError, r"absmax_offset must be a scalar", ("(1,)",)),
        ),
        (
            "block_size 0",
            lambda p: _matmul(p, weight=_weight(block_size=0)),
            Refused(ValueError, r"block_size must be one of", ("=0",)),
        ),
        (
            "block_size 48",
            lambda p: _matmul(p, weight=_weight(block_size=48)),
            Refused(ValueError, r"block_size must be one of", ("=48",)),
        ),
        (
            "weight shape with a zero",
            lambda p: _matmul(p, weight=_weight(shape=(0, N))),
            Refused(ValueError, r"weight.shape", ("(0, 32)",)),
        ),
        ("NaN in x", lambda p: _non_finite_x(p, nan), Correct()),
        ("Inf in x", lambda p: _non_finite_x(p, inf), Correct()),
        ("x with no rows", _empty_batch, Correct()),
    ]


def _both_paths():
    cases = []
    for name, run, expect in _matmul_specs():
        for label, pure in (("fused", False), ("pure TF", True)):
            cases.append(
                Case(
                    f"nf4_matmul ({label})",
                    name,
                    lambda tmp, run=run, pure=pure: run(pure),
                    expect,
                )
            )
    return cases


CASES = _both_paths()
