"""QLoRA models under tf.distribute: MirroredStrategy on two logical CPUs,
MultiWorkerMirroredStrategy with two worker processes on localhost, and the
host-offload placement checked across two devices. Each run is a separate
process (see distribute_worker.py)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "distribute_worker.py")


def _env(**extra):
    return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2", **extra)


def _run(mode, tmp_path, timeout=300):
    out = tmp_path / f"{mode}.json"
    proc = subprocess.run(
        [sys.executable, WORKER, mode, str(out)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run("single", tmp_path_factory.mktemp("single"))


def _assert_same_training(got, want):
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-5)
    assert got["lora"].keys() == want["lora"].keys()
    for path, value in want["lora"].items():
        np.testing.assert_allclose(
            got["lora"][path], value, rtol=1e-4, atol=1e-6, err_msg=path
        )


@pytest.mark.slow
def test_mirrored_strategy_matches_single_device(single, tmp_path):
    got = _run("mirrored", tmp_path)
    assert got["replicas"] == 2
    assert got["variable_type"] == "MirroredVariable"
    assert got["loss"][-1] < 0.8 * got["loss"][0]
    _assert_same_training(got, single)


@pytest.mark.slow
def test_offloaded_state_lives_on_the_host_device(single, tmp_path):
    got = _run("offload_devices", tmp_path)
    assert [d.endswith("CPU:1") for d in got["model_devices"]] == [True]
    assert [d.endswith("CPU:0") for d in got["slot_devices"]] == [True]
    assert got["num_slots"] == 2 * len(got["lora"])
    _assert_same_training(got, single)


@pytest.mark.slow
def test_offload_under_mirrored_strategy_is_refused(tmp_path):
    got = _run("offload_mirrored", tmp_path)
    assert got["error"] is not None
    assert "offload_optimizer=True is not supported under" in got["error"]
    assert "MirroredStrategy" in got["error"]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_matches_single_device(
    single, tmp_path
):
    workers = [f"localhost:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        config = {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": index},
        }
        out = tmp_path / f"worker{index}.json"
        procs.append(
            (
                out,
                subprocess.Popen(
                    [sys.executable, WORKER, "multiworker", str(out)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=_env(TF_CONFIG=json.dumps(config)),
                ),
            )
        )
    results = []
    try:
        for out, proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.read_text()))
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [r["task"] for r in results] == [0, 1]
    for got in results:
        assert got["replicas"] == 2
        _assert_same_training(got, single)
