"""SavedModel export (fused and portable), loaded in fresh processes.

The exports are made once per module (a Functional model and a tiny
keras_hub BertBackbone with dict inputs, both after `apply()` with nonzero
LoRA B); each subprocess loads all of them, so that the tests stay fast.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import keras_qlora
from keras_qlora import ops as qops
from keras_qlora.export import input_signature

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP_PREFIX = "KerasQLoRA>"
SEQ = 8


def _randomize_lora(q, seed):
    rng = np.random.default_rng(seed)
    for layer in q.qlora_layers(lora_only=True).values():
        value = rng.standard_normal(layer.lora_b.shape).astype("float32")
        layer.lora_b.assign(0.1 * value)


def _functional():
    inp = keras.Input((16,), name="features")
    h = keras.layers.Dense(32, activation="relu", name="query")(inp)
    out = keras.layers.Dense(4, name="value")(h)
    q = keras_qlora.apply(keras.Model(inp, out), rank=4, verbose=False)
    _randomize_lora(q, 0)
    return q


def _bert():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=SEQ,
    )
    q = keras_qlora.apply(backbone, rank=2, verbose=False)
    _randomize_lora(q, 1)
    return q


def _bert_inputs():
    rng = np.random.default_rng(2)
    mask = np.ones((2, SEQ), "int32")
    mask[1, 5:] = 0
    return {
        "token_ids": rng.integers(0, 50, (2, SEQ)).astype("int32"),
        "segment_ids": (np.arange(SEQ) >= 4).astype("int32")[None].repeat(2, 0),
        "padding_mask": mask,
    }


def _op_types(path):
    """Every op type in the SavedModel's graph and function library."""
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    types = set()
    for graph in saved.meta_graphs:
        types.update(node.op for node in graph.graph_def.node)
        for function in graph.graph_def.library.function:
            types.update(node.op for node in function.node_def)
    return types


def _run(code, cwd, with_package=True, **env):
    full_env = dict(os.environ, **env)
    full_env.pop("PYTHONPATH", None)
    if with_package:
        full_env["PYTHONPATH"] = ROOT
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Paths of four SavedModels, their inputs and the Keras outputs."""
    root = tmp_path_factory.mktemp("export")
    x = np.random.default_rng(3).standard_normal((3, 16)).astype("float32")
    bert_x = _bert_inputs()
    np.save(root / "x.npy", x)
    np.savez(root / "bert_x.npz", **bert_x)

    # Fused exports of never-called models; portable ones after a call
    # (Keras itself cannot infer a called QLoRAModel's inputs).
    q = _functional()
    keras_qlora.export(q, root / "func_fused")
    np.save(root / "func_ref.npy", np.asarray(q(x)))
    keras_qlora.export(q, root / "func_portable", portable=True)
    bert = _bert()
    keras_qlora.export(bert, root / "bert_fused")
    ref = bert(bert_x)
    np.savez(
        root / "bert_ref.npz", **{k: np.asarray(v) for k, v in ref.items()}
    )
    keras_qlora.export(bert, root / "bert_portable", portable=True)
    return {"root": root, "func": q, "bert": bert}


def _check_outputs(root, kind):
    got = np.load(root / f"func_{kind}_out.npy")
    np.testing.assert_allclose(
        got, np.load(root / "func_ref.npy"), rtol=1e-5, atol=1e-5
    )
    got, want = (
        np.load(root / f"bert_{kind}_out.npz"),
        np.load(root / "bert_ref.npz"),
    )
    assert sorted(got.files) == ["pooled_output", "sequence_output"]
    for name in got.files:
        np.testing.assert_allclose(
            got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name
        )


PLAIN_TF_LOAD = """
    import importlib.abc, json, sys

    class Refuse(importlib.abc.MetaPathFinder):
        tried = []

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "keras_qlora":
                self.tried.append(name)
                raise ImportError("keras_qlora must not be imported here")

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    import tensorflow as tf

    func = tf.saved_model.load("func_portable")
    x = np.load("x.npy")
    serving = func.signatures["serving_default"]
    (arg,) = serving.structured_input_signature[1]
    (key,) = serving.structured_outputs
    by_sig = serving(**{arg: tf.constant(x)})[key].numpy()
    by_serve = func.serve(x).numpy()
    np.testing.assert_array_equal(by_sig, by_serve)
    np.save("func_portable_out.npy", by_serve)

    bert = tf.saved_model.load("bert_portable")
    feed = {k: tf.constant(v) for k, v in np.load("bert_x.npz").items()}
    by_sig = bert.signatures["serving_default"](**feed)
    by_serve = bert.serve(feed)
    for name in by_serve:
        np.testing.assert_array_equal(by_sig[name], by_serve[name])
    np.savez("bert_portable_out.npz",
             **{k: v.numpy() for k, v in by_serve.items()})
    print(json.dumps({"tried": Refuse.tried,
                      "imported": "keras_qlora" in sys.modules}))
"""


def test_portable_savedmodel_serves_in_plain_tensorflow(exported):
    root = exported["root"]
    for name in ("func_portable", "bert_portable"):
        custom = {t for t in _op_types(root / name) if t.startswith(OP_PREFIX)}
        assert custom == set(), name
    result = _run(PLAIN_TF_LOAD, cwd=root, with_package=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"tried": [], "imported": False}
    _check_outputs(root, "portable")


FUSED_LOAD = """
    import numpy as np
    import tensorflow as tf

    try:
        tf.saved_model.load("func_fused")
    except Exception as err:
        print("plain load failed:", "KerasQLoRA>NF4Matmul" in str(err))
    import keras_qlora

    func = keras_qlora.load_saved_model("func_fused")
    np.save("func_fused_out.npy", func.serve(np.load("x.npy")).numpy())
    bert = keras_qlora.load_saved_model("bert_fused")
    out = bert.serve(dict(np.load("bert_x.npz")))
    np.savez("bert_fused_out.npz", **{k: v.numpy() for k, v in out.items()})
"""


def _require_fused():
    if qops.fused_library() is None:
        pytest.fail(f"fused op unavailable: {qops.active_path()}")


def test_fused_savedmodel_loads_through_keras_qlora(exported):
    _require_fused()
    root = exported["root"]
    for name in ("func_fused", "bert_fused"):
        assert "KerasQLoRA>NF4Matmul" in _op_types(root / name), name
    result = _run(FUSED_LOAD, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plain load failed: True" in result.stdout
    _check_outputs(root, "fused")


def test_saved_weights_are_the_4bit_variables_each_once(exported):
    for name in ("func_portable", "bert_portable"):
        model = exported[name.split("_")[0]]
        prefix = str(exported["root"] / name / "variables" / "variables")
        reader = tf.train.load_checkpoint(prefix)
        dtypes = reader.get_variable_to_dtype_map()
        saved = sorted(
            (dtypes[key].name, tuple(shape))
            for key, shape in tf.train.list_variables(prefix)
            if key.endswith("VARIABLE_VALUE")
        )
        want = sorted((v.dtype, tuple(v.shape)) for v in model.variables)
        assert saved == want, name
        # Packed codes and 8-bit block scales of every NF4 layer.
        uint8 = [shape for dtype, shape in saved if dtype == "uint8"]
        assert len(uint8) == 2 * len(model.qlora_layers()), name


def test_export_of_a_called_model_matches_keras(tmp_path):
    q = _functional()
    before = input_signature(q)
    x = np.ones((2, 16), "float32")
    want = np.asarray(q(x))
    after = input_signature(q)
    assert [s.shape for s in before] == [s.shape for s in after]
    path = keras_qlora.export(q, tmp_path / "saved", portable=True)
    assert path == str(tmp_path / "saved")
    # overwrite=True replaces an earlier export (here with a fused one).
    keras_qlora.export(q, path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["saved"]
    loaded = keras_qlora.load_saved_model(path)
    np.testing.assert_allclose(loaded.serve(x), want, rtol=1e-5, atol=1e-5)


def test_export_refuses_to_overwrite(tmp_path):
    q = _functional()
    target = tmp_path / "saved"
    target.mkdir()
    with pytest.raises(FileExistsError, match="already exists.*overwrite"):
        keras_qlora.export(q, target)
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a SavedModel directory"):
        keras_qlora.export(q, target, overwrite=True)
    assert os.listdir(target) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["saved"]


class _NeverCalled(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.query = keras.layers.Dense(4, name="query")

    def build(self, input_shape):
        self.query.build(input_shape)

    def call(self, x):
        return self.query(x)


def test_export_rejects_bad_models_and_flags(tmp_path):
    target = tmp_path / "saved"
    unbuilt = keras.Sequential([keras.layers.Dense(2)], name="unbuilt")
    with pytest.raises(ValueError, match="Model 'unbuilt' is not built"):
        keras_qlora.export(unbuilt, target)
    with pytest.raises(TypeError, match="expects a keras.Model.*Dense"):
        keras_qlora.export(keras.layers.Dense(2), target)

    base = _NeverCalled(name="sub")
    base.build((None, 8))
    with pytest.raises(ValueError, match="model 'sub': its inputs are unknown"):
        keras_qlora.export(base, target)
    q = keras_qlora.apply(base, rank=2, verbose=False)
    with pytest.raises(ValueError, match="'qlora_sub': its inputs are unknown"):
        keras_qlora.export(q, target)
    q(np.ones((1, 8), "float32"))  # now Keras knows the inputs
    assert [tuple(s.shape) for s in input_signature(q)] == [(None, 8)]

    q = _functional()
    with pytest.raises(TypeError, match="portable must be a bool.*'yes'"):
        keras_qlora.export(q, target, portable="yes")
    with pytest.raises(TypeError, match="overwrite must be a bool.*1"):
        keras_qlora.export(q, target, overwrite=1)
    assert os.listdir(tmp_path) == []


def test_fallback_when_the_library_cannot_be_built(tmp_path, exported):
    """No compiler: warn once, use the reference path; exports need no op;
    a fused SavedModel fails to load with a message naming the fix."""
    _require_fused()  # so that func_fused does contain the op
    root = exported["root"]
    result = _run(
        f"""
        import warnings, numpy as np, keras, keras_qlora
        from keras_qlora import ops
        from keras_qlora.export import custom_op_types
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
        path = keras_qlora.export(q, {str(tmp_path / "ref")!r})
        assert custom_op_types(path) == [], custom_op_types(path)
        loaded = keras_qlora.load_saved_model({str(root / "func_portable")!r})
        np.save("out.npy", loaded.serve(np.load({str(root / "x.npy")!r})))
        try:
            keras_qlora.load_saved_model({str(root / "func_fused")!r})
        except RuntimeError as err:
            assert "portable=True" in str(err), str(err)
            print("ok")
        """,
        cwd=tmp_path,
        CXX="/nonexistent/g++",
        KERAS_QLORA_CACHE=str(tmp_path / "empty_cache"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npy"),
        np.load(root / "func_ref.npy"),
        rtol=1e-5,
        atol=1e-5,
    )
    assert not any(t.startswith(OP_PREFIX) for t in _op_types(tmp_path / "ref"))


def test_reference_path_is_scoped_to_the_block_and_the_thread():
    import threading

    from keras_qlora.quantizers import quantize_nf4

    _require_fused()
    state = quantize_nf4(np.ones((8, 4), "float32"))

    def op_types():
        fn = tf.function(lambda x: qops.nf4_matmul(x, state))
        graph = fn.get_concrete_function(tf.TensorSpec((None, 8))).graph
        return {op.type for op in graph.get_operations()}

    assert qops.OP_TYPE in op_types()
    seen = []
    with qops.reference_path():
        with qops.reference_path():
            pass
        assert qops.active_path() == (
            "reference",
            "forced by keras_qlora.ops.reference_path()",
        )
        assert not any(t.startswith(OP_PREFIX) for t in op_types())
        other = threading.Thread(target=lambda: seen.append(qops.active_path()))
        other.start()
        other.join()
    assert seen[0][0] == "fused"
    assert qops.active_path()[0] == "fused"
    assert qops.OP_TYPE in op_types()
