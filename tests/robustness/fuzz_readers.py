"""Fuzzes keras_qlora's file readers with hypothesis; run by test_fuzz.py in
a subprocess (so a crash or hang fails the test instead of the run).

Each reader gets mutations of a valid file (truncation, byte flips,
insertions) and arbitrary JSON values where it reads JSON. The only
allowed outcomes are success or a `ValueError` / `TypeError` (the library's
clear errors); anything else (KeyError, AttributeError, RecursionError,
IndexError, struct.error, ...) fails, and hypothesis prints the input.

Prints one line per reader: examples run and how they ended.
"""

import collections
import json
import os
import struct
import sys
import tempfile

import numpy as np
import safetensors.numpy
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_qlora.adapters import config as adapter_config
from keras_qlora.interop import bitsandbytes as bnb_format
from keras_qlora.interop import peft_files
from keras_qlora.loading import files as preset_files
from keras_qlora.quantizers import quantize_nf4
from keras_qlora.training import checkpoint

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "500"))
ALLOWED = (ValueError, TypeError)
OUTCOMES = collections.defaultdict(collections.Counter)
TMP = tempfile.mkdtemp(prefix="kq-fuzz-")

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


def _mutations(valid: bytes):
    """Truncations, byte flips and insertions of `valid`."""
    n = len(valid)
    cut = st.integers(0, n).map(lambda i: valid[:i])
    flip = st.tuples(st.integers(0, n - 1), st.integers(0, 255)).map(
        lambda t: valid[: t[0]] + bytes([t[1]]) + valid[t[0] + 1 :]
    )
    insert = st.tuples(st.integers(0, n), st.binary(max_size=16)).map(
        lambda t: valid[: t[0]] + t[1] + valid[t[0] :]
    )
    return cut | flip | insert


def _field_edits(valid: dict):
    """`valid` with one field (possibly nested one level) replaced."""
    keys = sorted(valid)

    def edit(args):
        key, value, drop = args
        out = json.loads(json.dumps(valid))
        if drop:
            out.pop(key, None)
        else:
            out[key] = value
        return json.dumps(out).encode()

    return st.tuples(st.sampled_from(keys), JSON, st.booleans()).map(edit)


def _run(name, reader, data):
    try:
        reader(data)
    except ALLOWED as err:
        OUTCOMES[name][f"clear error ({type(err).__name__})"] += 1
        return
    OUTCOMES[name]["accepted"] += 1


def _file(data, name):
    path = os.path.join(TMP, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _valid_adapter_config():
    return {
        "format": adapter_config.FORMAT,
        "format_version": adapter_config.FORMAT_VERSION,
        "adapter_name": "default",
        "rank": 4,
        "alpha": 8.0,
        "dropout": 0.0,
        "use_rslora": False,
        "target_paths": ["query"],
        "modules_to_save": [],
        "nf4": {"block_size": 64, "double_quant": True, "scale_search": True},
        "base_model": {"algorithm": "x", "sha256": "0" * 64, "layers": {}},
        "weights_sha256": "0" * 64,
    }


def _valid_peft_config():
    return {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["query"],
        "rank_pattern": {"query": 2},
        "alpha_pattern": {},
        "use_rslora": False,
    }


def _valid_state():
    return {
        "format": checkpoint.FORMAT,
        "format_version": checkpoint.FORMAT_VERSION,
        "epoch": 1,
        "adapter_name": "default",
        "optimizer": [],
    }


SAFETENSORS = safetensors.numpy.save(
    {
        "base_model.model.query.lora_A.weight": np.ones((2, 4), "float32"),
        "base_model.model.query.lora_B.weight": np.ones((4, 2), "float32"),
    }
)
QUANT_STATE = bnb_format.to_bitsandbytes(
    quantize_nf4(np.ones((64, 8), "float32"), 64), prefix="w"
)
STATE_KEY = next(k for k in QUANT_STATE if "quant_state" in k)


def _bnb_reader(data):
    state = dict(QUANT_STATE)
    state[STATE_KEY] = np.frombuffer(data, np.uint8)
    bnb_format.from_bitsandbytes(state, prefix="w")


READERS = {
    "adapter_config.json": (
        lambda d: adapter_config.parse(d, "adapter_config.json"),
        json.dumps(_valid_adapter_config()).encode(),
        _valid_adapter_config(),
    ),
    "peft adapter_config.json": (
        lambda d: peft_files.parse_config(d, "adapter_config.json"),
        json.dumps(_valid_peft_config()).encode(),
        _valid_peft_config(),
    ),
    "peft adapter_model.safetensors": (
        lambda d: peft_files.read_tensors(d, "adapter_model.safetensors"),
        SAFETENSORS,
        None,
    ),
    "preset *.safetensors": (
        lambda d: preset_files.check_safetensors(_file(d, "m.safetensors")),
        SAFETENSORS,
        None,
    ),
    "trainer_state.json": (
        lambda d: checkpoint._read_state(_file(d, "trainer_state.json")),
        json.dumps(_valid_state()).encode(),
        _valid_state(),
    ),
    "bitsandbytes quant_state": (
        _bnb_reader,
        np.asarray(QUANT_STATE[STATE_KEY], np.uint8).tobytes(),
        json.loads(np.asarray(QUANT_STATE[STATE_KEY], np.uint8).tobytes()),
    ),
}


def fuzz(name):
    reader, valid, fields = READERS[name]
    strategy = _mutations(valid) | JSON.map(lambda v: json.dumps(v).encode())
    if fields is not None:
        strategy = strategy | _field_edits(fields)
    strategy = strategy | st.just(struct.pack("<Q", 2**63) + b"{}")

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(data):
        _run(name, reader, data)

    run()


if __name__ == "__main__":
    for reader_name in READERS:
        fuzz(reader_name)
        counts = ", ".join(
            f"{k}: {v}" for k, v in sorted(OUTCOMES[reader_name].items())
        )
        print(
            f"{reader_name}: {sum(OUTCOMES[reader_name].values())} "
            f"examples; {counts}"
        )
    sys.stdout.flush()
