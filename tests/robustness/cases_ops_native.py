"""Catalog cases (see catalog.py): the native op library.

The raw ops of the loaded library (`keras_q_lo_ra_nf4_*`) on bad buffers,
and the two environment variables the op library reads:
`KERAS_QLORA_CPU_ISA` and `KERAS_QLORA_CACHE` (the op cache: a truncated,
replaced or unrecorded library must be rebuilt or the pure path must run,
with a warning, never a crash).

Every case here runs native code on bad buffers or loads a library from a
damaged cache: all are isolated (a child process).
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

from ._ops_support import BLOCK
from ._ops_support import K
from ._ops_support import N
from ._ops_support import _expected
from ._ops_support import _kernel
from ._ops_support import _state
from ._ops_support import _with
from ._ops_support import _x
from .catalog import Case
from .catalog import Correct
from .catalog import Refused

NO_COMPILER = "no-such-compiler-kq"


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


CASES = _raw_cases() + _isa_cases() + _cache_cases()
