"""Locating, caching and reporting the fused op library."""

import os
import subprocess
import sys

from keras_qlora import ops as qops
from keras_qlora.ops import _library

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
args = (s.packed, s.absmax, s.absmax_scale, np.float32(s.absmax_offset))
f = tf.function(lambda x: qops.nf4_matmul(x, *args, s.shape, s.block_size))
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

    key = _library.build_key()
    assert key == _library.build_key()
    monkeypatch.setattr(tf, "__version__", tf.__version__ + "-other")
    assert _library.build_key() != key
    loaded = qops.fused_library() is not None
    assert _library.status()["loaded"] == loaded


def test_self_test_covers_every_kernel_family_and_names_a_failure(monkeypatch):
    """The first-use self-test runs the real op on each case (on a GPU each
    reaches a different CUDA kernel) and passes; a library that is wrong
    only for bfloat16 is refused, with the case in the reason."""
    import tensorflow as tf

    lib = _library.load()
    assert lib is not None
    assert {c[3] for c in qops._SELF_TEST_CASES} == {"float32", "bfloat16"}
    assert {c[4] for c in qops._SELF_TEST_CASES} == {False, True}
    calls, reasons = [], []
    monkeypatch.setattr(_library, "mark_failed", reasons.append)

    class Spy:
        def keras_q_lo_ra_nf4_matmul(self, x, *args, **kwargs):
            calls.append((x.dtype.name, kwargs["transpose"]))
            return lib.keras_q_lo_ra_nf4_matmul(x, *args, **kwargs)

    assert qops._self_test(Spy()) is True
    assert len(calls) == len(qops._SELF_TEST_CASES) and not reasons

    class WrongForBfloat16(Spy):
        def keras_q_lo_ra_nf4_matmul(self, x, *args, **kwargs):
            y = super().keras_q_lo_ra_nf4_matmul(x, *args, **kwargs)
            return y * 1.05 if x.dtype == tf.bfloat16 else y

    assert qops._self_test(WrongForBfloat16()) is False
    assert len(reasons) == 1
    assert "bfloat16 x [24, 64] @ W (W [64, 40])" in reasons[0]
    assert "results differ from the reference" in reasons[0]
