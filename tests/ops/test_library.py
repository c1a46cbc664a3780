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
