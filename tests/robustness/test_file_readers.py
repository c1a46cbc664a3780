"""File readers and writers: malformed files get a clear error naming the
file and the field; a path that cannot be written names what blocks it."""

import json
import os

import keras
import numpy as np
import pytest

import keras_qlora
from keras_qlora.adapters import config as adapter_config
from keras_qlora.interop import peft_files
from keras_qlora.training import checkpoint


def _model():
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(8, name="query")]
    )
    model = keras_qlora.apply(model, rank=2, verbose=False)
    model.compile(optimizer="adam", loss="mse")
    return model


DEEP = ("[" * 100_000 + "]" * 100_000).encode()


@pytest.mark.parametrize(
    "reader",
    [
        lambda: adapter_config.parse(DEEP, "cfg.json"),
        lambda: peft_files.parse_config(DEEP, "adapter_config.json"),
    ],
    ids=["adapter-config", "peft-config"],
)
def test_deeply_nested_json_is_a_value_error(reader):
    with pytest.raises(ValueError, match=r"\.json is not valid JSON"):
        reader()


def test_deeply_nested_checkpoint_state(tmp_path):
    path = tmp_path / "trainer_state.json"
    path.write_bytes(DEEP)
    with pytest.raises(ValueError, match="trainer_state.json is not valid"):
        checkpoint._read_state(str(path))


def _peft_config(**fields):
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["query"],
    }
    config.update(fields)
    return json.dumps(config).encode()


def test_peft_pattern_with_a_global_flag_names_the_fix():
    data = _peft_config(rank_pattern={"(?i)query": 8})
    with pytest.raises(
        ValueError,
        match=r"'rank_pattern' key '\(\?i\)query' is not a valid module "
        r"pattern.*'\(\?i:query\)'",
    ):
        peft_files.parse_config(data, "adapter_config.json")
    # The scoped form is accepted and matches case-insensitively.
    config = peft_files.parse_config(
        _peft_config(rank_pattern={"(?i:QUERY)": 8}), "adapter_config.json"
    )
    assert config.rank_and_alpha("layer.0.query")[0] == 8


@pytest.mark.parametrize(
    "write",
    [
        lambda m, p: keras_qlora.save_adapter(m, p),
        lambda m, p: checkpoint.save_checkpoint(m, p, epoch=0),
        lambda m, p: keras_qlora.export(m, p),
    ],
    ids=["save_adapter", "save_checkpoint", "export"],
)
def test_a_file_in_the_way_is_named(tmp_path, write):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    target = str(blocker / "out")
    with pytest.raises(NotADirectoryError, match=f"{blocker} is a file"):
        write(_model(), target)
    assert blocker.read_text() == "x"
    assert os.listdir(tmp_path) == ["not_a_dir"]


def test_checkpoint_directory_that_is_a_file(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("x")
    model = _model()
    x = np.zeros((4, 16), "float32")
    callback = checkpoint.AdapterCheckpoint(str(blocker))
    with pytest.raises(NotADirectoryError, match=f"{blocker} is a file"):
        model.fit(x, x[:, :8], epochs=1, verbose=0, callbacks=[callback])


# -- NF4 state ----------------------------------------------------------------


def _state(**changes):
    from keras_qlora.quantizers import quantize_nf4

    state = quantize_nf4(np.ones((8, 8), "float32"), 64)
    fields = dict(
        packed=state.packed,
        absmax=state.absmax,
        shape=state.shape,
        block_size=state.block_size,
        absmax_scale=state.absmax_scale,
        absmax_offset=state.absmax_offset,
    )
    fields.update(changes)
    return keras_qlora.NF4State(**fields)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"absmax_offset": float("nan")}, ValueError, "absmax_offset holds"),
        ({"absmax_offset": 1e39}, ValueError, "absmax_offset holds"),
        ({"absmax_offset": "0.1"}, TypeError, "absmax_offset must be a num"),
        (
            {"absmax_scale": np.array([np.inf], "float32")},
            ValueError,
            "absmax_scale holds 1 NaN or Inf",
        ),
        (
            {
                "absmax": np.array([np.nan], "float32"),
                "absmax_scale": None,
                "absmax_offset": None,
            },
            ValueError,
            "absmax holds 1 NaN",
        ),
    ],
)
def test_non_finite_nf4_state_is_refused(changes, error, match):
    with pytest.raises(error, match=match):
        _state(**changes)


def test_bitsandbytes_offset_beyond_float32(bnb):
    import torch

    from keras_qlora.interop import from_bitsandbytes
    from keras_qlora.interop import to_bitsandbytes

    state = _state()
    sd = to_bitsandbytes(state)
    key = next(k for k in sd if "quant_state" in k)
    meta = json.loads(np.asarray(sd[key], np.uint8).tobytes())
    meta["nested_offset"] = 1e39
    raw = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()
    sd[key] = torch.from_numpy(raw)
    with pytest.raises(ValueError, match="finite in float32.*1e\\+39"):
        from_bitsandbytes(sd)


# -- .keras files -------------------------------------------------------------


def _edit_keras_file(path, edit_config=None, edit_weights=None):
    import shutil
    import zipfile

    import h5py

    work = path + ".d"
    with zipfile.ZipFile(path) as z:
        z.extractall(work)
    if edit_config:
        with open(os.path.join(work, "config.json")) as f:
            config = json.load(f)
        edit_config(config)
        with open(os.path.join(work, "config.json"), "w") as f:
            json.dump(config, f)
    if edit_weights:
        with h5py.File(os.path.join(work, "model.weights.h5"), "r+") as f:
            edit_weights(f)
    os.remove(path)
    with zipfile.ZipFile(path, "w") as z:
        for name in os.listdir(work):
            z.write(os.path.join(work, name), name)
    shutil.rmtree(work)


def _functional(tmp_path):
    inp = keras.Input((16,))
    out = keras.layers.Dense(8, name="query")(inp)
    model = keras_qlora.apply(keras.Model(inp, out), rank=2, verbose=False)
    path = str(tmp_path / "m.keras")
    model.save(path)
    return path


def test_edited_settings_in_a_keras_file_are_refused(tmp_path):
    path = _functional(tmp_path)

    def edit(config):
        config["config"]["settings"]["alpha"] = 32.0

    _edit_keras_file(path, edit_config=edit)
    with pytest.raises(
        ValueError, match=r"'query'.*lora_alpha: layer 16.0, model 32.0"
    ):
        keras.saving.load_model(path)


def test_nan_weights_in_a_keras_file_are_refused(tmp_path):
    path = _functional(tmp_path)

    def edit(f):
        # QLoRA layers store their variables by name (_variable_table).
        key = "base_model/layers/q_lo_ra_dense/vars/lora_b"
        f[key][...] = np.full(f[key].shape, np.nan, "float32")

    _edit_keras_file(path, edit_weights=edit)
    with pytest.raises(ValueError, match=r"'query': saved 'lora_b' holds NaN"):
        keras.saving.load_model(path)


def test_overwritten_nf4_bytes_in_a_keras_file_are_refused(tmp_path):
    # Every NF4 byte is a valid pair of codes: only the checksum saved with
    # the layer tells a corrupted file from a good one.
    path = _functional(tmp_path)
    good = keras.saving.load_model(path)

    def edit(f):
        key = "base_model/layers/q_lo_ra_dense/vars/nf4_packed"
        f[key][...] = np.full(f[key].shape, 0xFF, "uint8")

    _edit_keras_file(path, edit_weights=edit)
    with pytest.raises(
        ValueError,
        match=r"'query': its saved NF4 weights .*nf4_packed.* do "
        r"not match the checksum",
    ):
        keras.saving.load_model(path)
    assert good.qlora_layers()["query"].nf4_packed.shape[0] == 64


# -- SavedModel -------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sm") / "saved")
    keras_qlora.export(_model(), path, portable=True, verbose=False)
    return path


def _copy(src, tmp_path):
    import shutil

    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    return dst


def test_saved_model_missing_pb(tmp_path):
    with pytest.raises(FileNotFoundError, match="saved_model.pb is missing"):
        keras_qlora.load_saved_model(str(tmp_path))


def test_saved_model_truncated_pb(tmp_path, saved_model):
    path = _copy(saved_model, tmp_path)
    pb = os.path.join(path, "saved_model.pb")
    with open(pb, "rb") as f:
        data = f.read()
    with open(pb, "wb") as f:
        f.write(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"saved_model.pb is not a readable"):
        keras_qlora.load_saved_model(path)


def test_saved_model_truncated_variables(tmp_path, saved_model):
    path = _copy(saved_model, tmp_path)
    folder = os.path.join(path, "variables")
    for name in os.listdir(folder):
        if "data" in name:
            with open(os.path.join(folder, name), "r+b") as f:
                f.truncate(10)
    with pytest.raises(ValueError, match=f"SavedModel at {path}.*TensorFlow"):
        keras_qlora.load_saved_model(path)
