"""Locating, caching and reporting the fused op library."""

import os
import subprocess
import sys

from keras_qlora import ops as qops
from keras_qlora.ops import build
from keras_qlora.ops import fused
from keras_qlora.ops import loader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_info_command_reports_the_fused_path():
    result = subprocess.run(
        [sys.executable, "-m", "keras_qlora.ops", "--info"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.path.abspath(ROOT)),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "active path: fused" in result.stdout


def test_pure_tf_env_var_selects_the_reference_path():
    result = subprocess.run(
        [sys.executable, "-m", "keras_qlora.ops", "--info"],
        capture_output=True,
        text=True,
        env=dict(
            os.environ,
            PYTHONPATH=os.path.abspath(ROOT),
            KERAS_QLORA_PURE_TF="1",
        ),
        timeout=300,
    )
    assert "active path: reference" in result.stdout
    assert "KERAS_QLORA_PURE_TF=1" in result.stdout


_FIRST_USE_IN_GRAPH = """
import warnings
warnings.simplefilter("error")
import numpy as np
import tensorflow as tf
from keras_qlora import ops as qops
from keras_qlora.quantizers import quantize_nf4
s = quantize_nf4(np.ones((64, 8), "float32"))
w = qops.NF4Tensors.from_state(s)
f = tf.function(lambda x: qops.nf4_matmul(x, w))
y = f(tf.ones((2, 64)))
print("path:", qops.active_path()[0], float(y[0, 0]))
"""


def test_first_use_inside_a_traced_function_keeps_the_fused_path():
    # fit() traces its step before any eager call: the op's one-time
    # self-test must not run inside that graph.
    result = subprocess.run(
        [sys.executable, "-c", _FIRST_USE_IN_GRAPH],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.path.abspath(ROOT)),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "path: fused" in result.stdout


def test_cache_key_covers_sources_and_tensorflow(tmp_path, monkeypatch):
    import tensorflow as tf

    key = build.build_key()
    assert key == build.build_key()
    monkeypatch.setattr(tf, "__version__", tf.__version__ + "-other")
    assert build.build_key() != key
    loaded = qops.fused_library() is not None
    assert loader.status()["loaded"] == loaded


def test_self_test_covers_every_kernel_family_and_names_a_failure(monkeypatch):
    """The first-use self-test runs the real op on each case (on a GPU each
    reaches a different CUDA kernel) and passes; a library that is wrong
    only for bfloat16 is refused, with the case in the reason."""
    import tensorflow as tf

    lib = loader.load()
    assert lib is not None
    assert {c[3] for c in fused._SELF_TEST_CASES} == {"float32", "bfloat16"}
    assert {c[4] for c in fused._SELF_TEST_CASES} == {False, True}
    assert {c[5] for c in fused._SELF_TEST_CASES} == {"nf4", "fp4", "int8"}
    calls, reasons = [], []
    monkeypatch.setattr(loader, "mark_failed", reasons.append)

    class Spy:
        def keras_q_lo_ra_nf4_matmul(self, x, *args, **kwargs):
            calls.append((x.dtype.name, kwargs["transpose"]))
            return lib.keras_q_lo_ra_nf4_matmul(x, *args, **kwargs)

    assert fused._self_test(Spy()) is True
    assert len(calls) == len(fused._SELF_TEST_CASES) and not reasons

    class WrongForBfloat16(Spy):
        def keras_q_lo_ra_nf4_matmul(self, x, *args, **kwargs):
            y = super().keras_q_lo_ra_nf4_matmul(x, *args, **kwargs)
            return y * 1.05 if x.dtype == tf.bfloat16 else y

    assert fused._self_test(WrongForBfloat16()) is False
    assert len(reasons) == 1
    assert "bfloat16 x [24, 64] @ W (W [64, 40], nf4)" in reasons[0]
    assert "results differ from the reference" in reasons[0]


def test_cache_key_covers_the_shared_format_header(tmp_path, monkeypatch):
    """The CPU and CUDA code share custom_ops/include/; the CUDA stand-ins
    of custom_ops/testing/ are not part of the library."""
    import shutil

    copy = tmp_path / "custom_ops"
    shutil.copytree(build.source_dir(), copy)
    monkeypatch.setattr(build, "source_dir", lambda: copy)
    key = build.build_key()
    header = copy / "include" / "nf4_format.h"
    header.write_text(header.read_text() + "\n// changed\n")
    changed = build.build_key()
    assert changed != key
    for stand_in in (copy / "testing").rglob("*.h"):
        stand_in.write_text(stand_in.read_text() + "\n// changed\n")
    assert build.build_key() == changed
    assert not any("testing" in p.parts for p in build.source_files())


def test_a_truncated_cached_library_is_never_loaded(tmp_path):
    # Loading a truncated .so killed every process with SIGBUS, the
    # diagnostic --info included; now the record refuses it and, with no
    # compiler to rebuild it, the pure path runs.
    import pathlib
    import shutil

    import pytest

    here = pathlib.Path(build.__file__).parent
    if (here / build.LIBRARY_NAME).exists():
        pytest.skip("a library prebuilt at install time is used first")
    good = build.find_or_build()
    target = tmp_path / "cache" / build.build_key()
    target.mkdir(parents=True)
    (target / build.LIBRARY_NAME).write_bytes(good.read_bytes()[:100_000])
    shutil.copy(good.parent / build.STAMP_NAME, target / build.STAMP_NAME)
    result = subprocess.run(
        [sys.executable, "-m", "keras_qlora.ops", "--info"],
        capture_output=True,
        text=True,
        env=dict(
            os.environ,
            PYTHONPATH=os.path.abspath(ROOT),
            KERAS_QLORA_CACHE=str(tmp_path / "cache"),
            CXX="no-such-compiler-kq",
        ),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "active path: reference" in result.stdout
    assert "no C++ compiler" in result.stdout
    assert "is not the one built (100000 bytes" in result.stderr


def test_verify_checks_key_size_hash_and_transient_cuda_errors(tmp_path):
    lib = tmp_path / build.LIBRARY_NAME
    lib.write_bytes(b"\x7fELF" + bytes(100))
    assert build.verify(lib, "k") == "no record of its build"
    build._write_record(lib, "k")
    assert build.verify(lib, "k") is None
    assert "other sources" in build.verify(lib, "other")
    lib.write_bytes(b"\x7fELF" + bytes(99))
    assert "103 bytes, 104 were written" in build.verify(lib, "k")
    lib.write_bytes(b"\x7fELX" + bytes(100))
    assert "SHA-256 differs" in build.verify(lib, "k")
    # A CPU-only library left by a CUDA build that ran out of disk is used
    # by this process but rebuilt by the next.
    (tmp_path / build.CUDA_ERROR_NAME).write_text(
        "nvcc fatal: write failed: No space left on device"
    )
    build._write_record(lib, "k")
    assert "may pass" in build.verify(lib, "k")
    (tmp_path / build.CUDA_ERROR_NAME).write_text("error: unknown type 'x'")
    build._write_record(lib, "k")
    assert build.verify(lib, "k") is None
