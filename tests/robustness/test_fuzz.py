"""Hypothesis fuzz of the file readers, in a subprocess with a time bound:
only success or a clear ValueError / TypeError, never a crash, a hang or
another exception."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("hypothesis", reason="the fuzz needs hypothesis")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_file_readers_survive_fuzzing():
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        run = subprocess.run(
            [sys.executable, os.path.join(HERE, "fuzz_readers.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the reader fuzz hung (no result in 300 s)")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    lines = [line for line in run.stdout.splitlines() if "examples;" in line]
    assert len(lines) == 6, run.stdout
    print("\n".join(lines))
