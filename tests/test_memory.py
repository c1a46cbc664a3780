"""apply() frees the float kernels it replaces, down to the OS.

Three levels: no float kernel of a converted layer stays reachable from
Python; TF's CPU allocator gets their bytes back; and, when TF takes its
memory from malloc (TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1), the process RSS
drops, because apply() trims glibc's heap. The last two run in a fresh
interpreter so that the allocator setting and the RSS belong to the test.
"""

import gc
import json
import os
import platform
import subprocess
import sys
import weakref

import keras
import numpy as np
import pytest

import keras_qlora
from keras_qlora import convert

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LINUX_GLIBC = (
    platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
)
# TF's x86 Linux wheels use oneDNN, whose CPU allocator keeps statistics.
_ONEDNN = _LINUX_GLIBC and platform.machine() in ("x86_64", "AMD64")

# 12 float32 [2048, 2048] kernels: 192 MiB, 26 MiB once NF4.
_CHILD = """
import gc, json
import keras
import keras_qlora
import tensorflow as tf

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

def tf_live():
    try:
        return tf.config.experimental.get_memory_info("CPU:0")["current"]
    except ValueError:
        return None

layers = [keras.Input((2048,))]
layers += [keras.layers.Dense(2048, name=f"dense_{i}") for i in range(12)]
model = keras.Sequential(layers)
gc.collect()
built, live_built = rss(), tf_live()
float_bytes = sum(int(l.kernel.numpy().nbytes) for l in layers[1:])
q = keras_qlora.apply(model, rank=4, target_modules="all-linear",
                      verbose=False)
gc.collect()
kept = sum(
    keras_qlora.convert.nbytes(v) for v in q.weights
)
print("RESULT " + json.dumps(dict(
    built=built, after=rss(), live_built=live_built, live_after=tf_live(),
    float_bytes=float_bytes, kept_bytes=kept,
)))
"""


def _run_child(env_updates):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "TF_ENABLE_ONEDNN_OPTS")
    }
    env.update(env_updates, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_ROOT, env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"child failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _model():
    inputs = keras.Input((8, 64))
    x = keras.layers.EinsumDense(
        "abc,cde->abde", output_shape=(8, 4, 16), bias_axes="de", name="query"
    )(inputs)
    x = keras.layers.Reshape((8, 64))(x)
    x = keras.layers.Dense(128, name="up")(x)
    x = keras.layers.Dense(64, name="down")(x)
    return keras.Model(inputs, x)


def test_no_float_kernel_of_a_converted_layer_stays_reachable():
    model = _model()
    linear = [
        layer
        for layer in model.layers
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
    ]
    # The Keras variables and the TF variables that hold their buffers.
    refs = [weakref.ref(layer.kernel) for layer in linear]
    refs += [weakref.ref(layer.kernel.value) for layer in linear]
    del linear
    q = keras_qlora.apply(
        model, rank=4, target_modules="all-linear", verbose=False
    )
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert alive == [], [getattr(v, "name", v) for v in alive]
    assert q(np.ones((2, 8, 64), "float32")).shape == (2, 8, 64)


@pytest.mark.skipif(not _ONEDNN, reason="needs TF's oneDNN CPU allocator")
def test_tf_allocator_gets_the_float_kernels_back():
    # With TF's own pool (the package default is malloc, see below).
    got = _run_child({"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "0"})
    assert got["live_built"] is not None, "TF keeps no allocator statistics"
    # Everything TF still holds is the NF4 model's own variables (+ 4 MiB).
    assert got["live_after"] <= got["kept_bytes"] + 4 * 2**20, got
    assert got["live_built"] - got["live_after"] >= 0.95 * (
        got["float_bytes"] - got["kept_bytes"]
    ), got


@pytest.mark.skipif(not _LINUX_GLIBC, reason="RSS via /proc, malloc_trim")
def test_rss_drops_after_apply_with_malloc_backed_tf():
    got = _run_child({"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1"})
    freed = got["float_bytes"] - got["kept_bytes"]  # ~166 MiB
    # Generous margin: RSS also moves with code loaded by apply() itself.
    assert got["built"] - got["after"] >= 0.6 * freed, got


@pytest.mark.skipif(not _LINUX_GLIBC, reason="RSS via /proc, malloc_trim")
def test_rss_drops_after_apply_by_default():
    # `import keras_qlora` makes TF allocate from malloc unless the user
    # chose otherwise: no setting in the user's shell is needed.
    got = _run_child({})
    assert not got["live_built"], "TF's own pool was used"
    freed = got["float_bytes"] - got["kept_bytes"]
    assert got["built"] - got["after"] >= 0.6 * freed, got


@pytest.mark.skipif(not _LINUX_GLIBC, reason="malloc_trim is glibc's")
def test_release_free_memory_trims_holes_in_the_heap():
    blocks = [bytearray(64 * 1024) for _ in range(2000)]  # 125 MiB, heap
    # Free every other block: holes that free() itself cannot give back.
    del blocks[::2]
    try:
        assert convert.release_free_memory() is True
    finally:
        del blocks


def test_release_free_memory_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(convert.platform, "libc_ver", lambda: ("", ""))
    assert convert.release_free_memory() is False
