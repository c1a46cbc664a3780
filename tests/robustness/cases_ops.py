"""Catalog cases (see catalog.py): the NF4 op and the quantizers.

Entry points: `nf4_matmul` on both of its paths (the fused C++ op and the
pure TensorFlow reference, each case once per path), `NF4State`,
`NF4Tensors`, `quantize_nf4`, `dequantize_nf4`, `quantize_nf4_fused`, the
raw ops of the loaded library, and the two environment variables the op
library reads: `KERAS_QLORA_CPU_ISA` and `KERAS_QLORA_CACHE` (the op cache:
a truncated, replaced or unrecorded library must be rebuilt or the pure
path must run, with a warning, never a crash).

Cases that run native code on bad buffers, or that load a library from a
damaged cache, are isolated (a child process).
"""

import contextlib
import io
import json
import os
import pathlib
import shutil
import warnings

import numpy as np
import tensorflow as tf

from .catalog import Case
from .catalog import Correct
from .catalog import Refused

K, N, BLOCK = 64, 32, 64  # 2048 elements, 32 blocks, 1024 packed bytes
NO_COMPILER = "no-such-compiler-kq"


def _state(double_quant=True, k=K, n=N, block_size=BLOCK):
    from keras_qlora.quantizers import quantize_nf4

    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((k, n)).astype("float32")
    return quantize_nf4(kernel, block_size, double_quant)


def _weight(double_quant=True, **fields):
    """An `NF4Tensors` of `_state()`, with `fields` replaced."""
    from keras_qlora.ops import NF4Tensors

    weight = NF4Tensors.from_state(_state(double_quant))
    values = dict(
        packed=weight.packed,
        absmax=weight.absmax,
        absmax_scale=weight.absmax_scale,
        absmax_offset=weight.absmax_offset,
        shape=weight.shape,
        block_size=weight.block_size,
    )
    values.update(fields)
    return NF4Tensors(**values)


def _x(m=2, width=K, dtype="float32"):
    rng = np.random.default_rng(1)
    return rng.standard_normal((m, width)).astype(dtype)


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


def _expected(x, state, transpose=False):
    from keras_qlora.quantizers import dequantize_nf4

    w = dequantize_nf4(state).astype(np.float64)
    return np.asarray(x, np.float64) @ (w.T if transpose else w)


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


def _kernel(shape=(K, N)):
    return np.random.default_rng(2).standard_normal(shape).astype("float32")


def _with(value, at=(3, 4)):
    kernel = _kernel()
    kernel[at] = value
    return kernel


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


# ---------------------------------------------------- raw ops (isolated)


def _lib():
    from keras_qlora.ops import loader

    lib = loader.load()
    assert lib is not None, loader.status()["reason"]
    return lib


def _block_scales(weight_t, block_size=BLOCK):
    return _lib().keras_q_lo_ra_nf4_block_scales(
        weight_t, block_size=block_size
    )


def _encode(weight_t, scales, block_size=BLOCK):
    return _lib().keras_q_lo_ra_nf4_encode(
        weight_t, scales, block_size=block_size
    )


def _raw_matmul(x=None, packed=None, absmax=None, scale=None, **attrs):
    state = _state()
    return _lib().keras_q_lo_ra_nf4_matmul(
        _x() if x is None else x,
        state.packed if packed is None else packed,
        state.absmax if absmax is None else absmax,
        state.absmax_scale if scale is None else scale,
        np.float32(state.absmax_offset),
        **{"k": K, "n": N, "block_size": BLOCK, **attrs},
    )


def _raw_nan_x():
    x = _x(m=3)
    x[1, 0] = np.nan
    y = np.asarray(_raw_matmul(x=x), np.float64)
    assert np.isnan(y[1]).all(), y[1]
    keep = [0, 2]
    np.testing.assert_allclose(
        y[keep], _expected(x[keep], _state()), rtol=1e-4, atol=1e-4
    )


def _raw_specs():
    bad = tf.errors.InvalidArgumentError
    return [
        (
            "keras_q_lo_ra_nf4_block_scales",
            "weight_t of rank 1",
            lambda: _block_scales(_kernel((K,))),
            Refused(bad, r"weight_t must be a 2-D", ("[64]",)),
        ),
        (
            "keras_q_lo_ra_nf4_block_scales",
            "NaN in weight_t",
            lambda: _block_scales(_with(np.nan).T.copy()),
            Refused(bad, r"non-finite value \(nan\) at \[4, 3\]"),
        ),
        (
            "keras_q_lo_ra_nf4_block_scales",
            "Inf in weight_t",
            lambda: _block_scales(_with(np.inf).T.copy()),
            Refused(bad, r"non-finite value \(inf\) at \[4, 3\]"),
        ),
        (
            "keras_q_lo_ra_nf4_block_scales",
            "block_size 48",
            lambda: _block_scales(_kernel(), block_size=48),
            Refused(bad, r"block_size must be one of", ("48",)),
        ),
        (
            "keras_q_lo_ra_nf4_block_scales",
            "block_size 0",
            lambda: _block_scales(_kernel(), block_size=0),
            Refused(bad, r"block_size", ("0",)),
        ),
        (
            "keras_q_lo_ra_nf4_encode",
            "scales one short",
            lambda: _encode(_kernel().T, np.ones(31, "float32")),
            Refused(bad, r"scales must be a vector of one float32 per block"),
        ),
        (
            "keras_q_lo_ra_nf4_encode",
            "scales of rank 2",
            lambda: _encode(_kernel().T, np.ones((32, 1), "float32")),
            Refused(bad, r"scales must be a vector", ("[32,1]",)),
        ),
        (
            "keras_q_lo_ra_nf4_encode",
            "NaN in scales",
            lambda: _encode(
                _kernel().T,
                np.where(np.arange(32) == 7, np.nan, 1.0).astype("float32"),
            ),
            Refused(bad, r"scales must be finite: scales\[7\] = nan"),
        ),
        (
            "keras_q_lo_ra_nf4_encode",
            "NaN in weight_t",
            lambda: _encode(_with(np.nan).T.copy(), np.ones(32, "float32")),
            Refused(bad, r"non-finite value \(nan\)"),
        ),
        (
            "keras_q_lo_ra_nf4_matmul",
            "packed one byte short",
            lambda: _raw_matmul(packed=np.zeros(K * N // 2 - 1, "uint8")),
            Refused(bad, r"packed must"),
        ),
        (
            "keras_q_lo_ra_nf4_matmul",
            "absmax_scale empty with uint8 absmax",
            lambda: _raw_matmul(scale=np.zeros(0, "float32")),
            Refused(bad, r"absmax_scale must"),
        ),
        (
            "keras_q_lo_ra_nf4_matmul",
            "k * n overflowing int64",
            lambda: _raw_matmul(k=2**40, n=2**40),
            Refused(bad, r"overflows int64"),
        ),
        ("keras_q_lo_ra_nf4_matmul", "NaN in x", _raw_nan_x, Correct()),
    ]


# ---------------------------------------------- environment variables


def _bad_isa_matmul():
    os.environ["KERAS_QLORA_CPU_ISA"] = "sse9"
    from keras_qlora import ops

    ops.nf4_matmul(_x(), _state())


def _bad_isa_quantize():
    os.environ["KERAS_QLORA_CPU_ISA"] = "AVX2"
    from keras_qlora.ops.quantize import quantize_nf4_fused

    quantize_nf4_fused(_kernel())


def _bad_isa_info():
    """`python -m keras_qlora.ops --info` reports the bad value instead of
    failing: it is the command one runs to find out what is wrong."""
    os.environ["KERAS_QLORA_CPU_ISA"] = "fast"
    from keras_qlora.ops import __main__ as info

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        info.main(["--info"])
    text = out.getvalue()
    assert "active path: none" in text, text
    assert "KERAS_QLORA_CPU_ISA='fast'" in text, text


def _isa_cases():
    refused = Refused(
        ValueError,
        r"KERAS_QLORA_CPU_ISA must be one of auto, scalar, avx2, avx512",
        ("KERAS_QLORA_CPU_ISA=",),
    )
    return [
        Case(
            "KERAS_QLORA_CPU_ISA",
            "sse9, then nf4_matmul",
            lambda tmp: _bad_isa_matmul(),
            refused,
            isolate=True,
        ),
        Case(
            "KERAS_QLORA_CPU_ISA",
            "upper case AVX2, then quantize_nf4_fused",
            lambda tmp: _bad_isa_quantize(),
            refused,
            isolate=True,
        ),
        Case(
            "KERAS_QLORA_CPU_ISA",
            "fast, then --info",
            lambda tmp: _bad_isa_info(),
            Correct(),
            isolate=True,
        ),
    ]


# -------------------------------------------- the op cache (isolated)


def _cache_setup(tmp):
    """A private KERAS_QLORA_CACHE holding a copy of the good library and
    its record, under this TensorFlow's key, and no compiler: a library
    the record refuses cannot be rebuilt, so the pure path must run.

    Returns:
        The copied library's path.
    """
    from keras_qlora.ops import build
    from keras_qlora.ops import loader

    assert not loader.status()["tried"], "the op library was loaded already"
    good = build.find_or_build()  # the real cache (built once per worktree)
    target = pathlib.Path(tmp) / "cache" / build.build_key()
    target.mkdir(parents=True)
    shutil.copy(good, target / build.LIBRARY_NAME)
    shutil.copy(good.parent / build.STAMP_NAME, target / build.STAMP_NAME)
    os.environ["KERAS_QLORA_CACHE"] = str(pathlib.Path(tmp) / "cache")
    os.environ["CXX"] = NO_COMPILER
    return target / build.LIBRARY_NAME


def _falls_back(complaint):
    """`--info` and a matmul run on the pure path, say why, and the stderr
    names the refused library with `complaint` (None: no complaint)."""
    from keras_qlora.ops import __main__ as info
    from keras_qlora.ops import nf4_matmul

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        info.main(["--info"])
    assert "active path: reference" in out.getvalue(), out.getvalue()
    if complaint is not None:
        assert complaint in err.getvalue(), err.getvalue()[-2000:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = np.asarray(nf4_matmul(_x(), _state()))
    texts = [str(w.message) for w in caught]
    assert any("using the pure TensorFlow path" in t for t in texts), texts
    np.testing.assert_allclose(
        y, _expected(_x(), _state()), rtol=1e-4, atol=1e-4
    )
    return out.getvalue()


def _cache_truncated(tmp):
    lib = _cache_setup(tmp)
    lib.write_bytes(lib.read_bytes()[:100_000])
    out = _falls_back("is not the one built (100000 bytes")
    assert "no C++ compiler" in out, out


def _cache_garbage_record(tmp):
    lib = _cache_setup(tmp)
    (lib.parent / "_nf4_ops.json").write_text("{not json")
    _falls_back("(no record of its build)")


def _cache_record_a_list(tmp):
    lib = _cache_setup(tmp)
    (lib.parent / "_nf4_ops.json").write_text("[1, 2]")
    _falls_back("(built for other sources or another TensorFlow)")


def _edit_record(lib, **changes):
    path = lib.parent / "_nf4_ops.json"
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))


def _cache_wrong_size(tmp):
    lib = _cache_setup(tmp)
    _edit_record(lib, size=lib.stat().st_size + 1)
    _falls_back(f"({lib.stat().st_size} bytes, {lib.stat().st_size + 1}")


def _cache_wrong_sha(tmp):
    lib = _cache_setup(tmp)
    _edit_record(lib, sha256="0" * 64)
    _falls_back("its SHA-256 differs")


def _cache_directory(tmp):
    lib = _cache_setup(tmp)
    lib.unlink()
    lib.mkdir()
    (lib / "inside").write_text("x")
    _falls_back("is not the one built")
    assert (lib / "inside").read_text() == "x"


def _cache_recorded_garbage(tmp):
    """A file that is no library, recorded as if built: loading it fails
    cleanly (dlopen refuses it), and the pure path runs."""
    from keras_qlora.ops import build

    lib = _cache_setup(tmp)
    lib.write_bytes(b"\x7fELF" + bytes(4096))
    _edit_record(lib, size=lib.stat().st_size, sha256=build._sha256(lib))
    _falls_back(None)


def _cache_is_a_file(tmp):
    _cache_setup(tmp)
    cache = pathlib.Path(tmp) / "a_file"
    cache.write_text("not a folder")
    os.environ["KERAS_QLORA_CACHE"] = str(cache)
    out = _falls_back(None)
    assert str(cache) in out, out


def _cache_rebuilt(tmp):
    """The one case that compiles: a truncated library, with a compiler
    around, is rebuilt and the fused path runs. CPU kernels only
    (KERAS_QLORA_CUDA=0, its own cache key), which halves the compile."""
    from keras_qlora import ops
    from keras_qlora.ops import build
    from keras_qlora.ops import loader

    assert not loader.status()["tried"], "the op library was loaded already"
    os.environ["KERAS_QLORA_CUDA"] = "0"
    os.environ["KERAS_QLORA_CACHE"] = str(pathlib.Path(tmp) / "cache")
    key = build.build_key()
    lib = pathlib.Path(tmp) / "cache" / key / build.LIBRARY_NAME
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"\x7fELF" + bytes(100_000))
    record = {"key": key, "size": 3_000_000, "sha256": "0" * 64}
    (lib.parent / build.STAMP_NAME).write_text(json.dumps(record))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        name, reason = ops.active_path()
    assert name == "fused", reason
    assert "is not the one built (100004 bytes" in err.getvalue()
    assert build.verify(lib, key) is None
    y = np.asarray(ops.nf4_matmul(_x(), _state()))
    np.testing.assert_allclose(
        y, _expected(_x(), _state()), rtol=1e-4, atol=1e-4
    )


def _cache_cases():
    specs = [
        ("a truncated library", _cache_truncated),
        ("a record that is not JSON", _cache_garbage_record),
        ("a record that is a list", _cache_record_a_list),
        ("a record with a wrong size", _cache_wrong_size),
        ("a record with a wrong SHA-256", _cache_wrong_sha),
        ("a folder in place of the library", _cache_directory),
        ("a non-library recorded as built", _cache_recorded_garbage),
        ("the cache path a file", _cache_is_a_file),
        ("a truncated library, compiler present", _cache_rebuilt),
    ]
    return [
        Case("KERAS_QLORA_CACHE", name, run, Correct(), isolate=True)
        for name, run in specs
    ]


def _raw_cases():
    return [
        Case(entry, name, lambda tmp, run=run: run(), expect, isolate=True)
        for entry, name, run, expect in _raw_specs()
    ]


CASES = (
    _both_paths()
    + _quantizer_cases()
    + _raw_cases()
    + _isa_cases()
    + _cache_cases()
)
