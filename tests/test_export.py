"""SavedModel export with the fused op, loaded in fresh processes."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_qlora
from keras_qlora import ops as qops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model():
    inp = keras.Input((16,))
    h = keras.layers.Dense(32, activation="relu", name="query")(inp)
    out = keras.layers.Dense(4, name="value")(h)
    q = keras_qlora.apply(keras.Model(inp, out), rank=4, verbose=False)
    for layer in q.qlora_layers(lora_only=True).values():
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.05, "float32"))
    return q


def _run(code, **env):
    full_env = dict(os.environ, PYTHONPATH=ROOT, **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


LOAD_WITH_KERAS_QLORA = """
    import sys, numpy as np, keras_qlora
    loaded = keras_qlora.load_saved_model({path!r})
    x = np.load({x!r})
    np.save({out!r}, np.asarray(loaded.serve(x)))
"""


def test_fused_savedmodel_loads_in_a_fresh_process(tmp_path):
    if qops.fused_library() is None:
        pytest.fail(f"fused op unavailable: {qops.active_path()}")
    q = _model()
    x = np.random.default_rng(0).standard_normal((3, 16)).astype("float32")
    path = keras_qlora.export(q, tmp_path / "saved")
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npy"
    code = LOAD_WITH_KERAS_QLORA.format(
        path=str(path), x=str(tmp_path / "x.npy"), out=str(out)
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(out), q(x), rtol=1e-5, atol=1e-5)

    plain = _run(f"import tensorflow as tf; tf.saved_model.load({str(path)!r})")
    assert plain.returncode != 0
    assert "KerasQLoRA>NF4Matmul" in plain.stderr


def test_export_refuses_to_overwrite(tmp_path):
    q = _model()
    target = tmp_path / "saved"
    target.mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        keras_qlora.export(q, target)


def test_pure_path_export_loads_in_plain_tensorflow(tmp_path):
    x = np.random.default_rng(1).standard_normal((2, 16)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    export = _run(
        f"""
        import numpy as np, keras, keras_qlora
        inp = keras.Input((16,))
        out = keras.layers.Dense(8, name="query")(inp)
        q = keras_qlora.apply(keras.Model(inp, out), rank=2, verbose=False)
        keras_qlora.export(q, {str(tmp_path / "pure")!r})
        np.save({str(tmp_path / "ref.npy")!r},
                np.asarray(q(np.load({str(tmp_path / "x.npy")!r}))))
        """,
        KERAS_QLORA_PURE_TF="1",
    )
    assert export.returncode == 0, export.stderr[-3000:]
    load = _run(
        f"""
        import numpy as np, tensorflow as tf, sys
        m = tf.saved_model.load({str(tmp_path / "pure")!r})
        assert "keras_qlora" not in sys.modules
        np.save({str(tmp_path / "out.npy")!r},
                np.asarray(m.serve(np.load({str(tmp_path / "x.npy")!r}))))
        """
    )
    assert load.returncode == 0, load.stderr[-3000:]
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npy"), np.load(tmp_path / "ref.npy"), atol=1e-6
    )


def test_fallback_when_the_library_cannot_be_built(tmp_path):
    result = _run(
        """
        import warnings, numpy as np, keras, keras_qlora
        from keras_qlora import ops
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inp = keras.Input((16,))
            q = keras_qlora.apply(
                keras.Model(inp, keras.layers.Dense(8, name="query")(inp)),
                rank=2, verbose=False)
            q(np.ones((2, 16), "float32"))
            q(np.ones((2, 16), "float32"))
        name, reason = ops.active_path()
        assert name == "reference", (name, reason)
        assert "no C++ compiler" in reason, reason
        fallback = [w for w in caught if "fused NF4 op" in str(w.message)]
        assert len(fallback) == 1, [str(w.message) for w in caught]
        print("ok")
        """,
        CXX="/nonexistent/g++",
        KERAS_QLORA_CACHE=str(tmp_path / "empty_cache"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
