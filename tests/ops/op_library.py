"""The fused op library for the op tests (run by pytest, and by the tests'
own subprocesses as scripts): loading it, the instruction sets this CPU
has, and running a test file as a worker under one KERAS_QLORA_CPU_ISA."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_library():
    """The loaded op module; a skip under KERAS_QLORA_PURE_TF=1, else a
    failure naming why it did not load."""
    from keras_qlora.ops import loader

    module = loader.load()
    if module is None:
        if os.environ.get("KERAS_QLORA_PURE_TF") == "1":
            pytest.skip("KERAS_QLORA_PURE_TF=1: the fused op is not loaded")
        pytest.fail(f"the fused op library did not load: {loader.status()}")
    return module


def cpu_isas():
    """The KERAS_QLORA_CPU_ISA values this CPU can run (besides auto)."""
    flags = pathlib.Path("/proc/cpuinfo").read_text().split()
    isas = {"scalar"}
    if "avx2" in flags and "fma" in flags:
        isas.add("avx2")
        if "avx512f" in flags:
            isas.add("avx512")
            if {"avx512bw", "avx512vl", "avx512_bf16"} <= set(flags):
                isas.add("avx512_bf16")
    return isas


def expected_auto_isa():
    """What KERAS_QLORA_CPU_ISA=auto picks on this CPU."""
    isas = cpu_isas()
    for isa in ("avx512_bf16", "avx512", "avx2"):
        if isa in isas:
            return isa
    return "scalar"


def run_worker(script, mode, env, timeout):
    """Runs `python script mode` with `env` added, the repository first on
    PYTHONPATH and the kernels' instruction set logged once (a VLOG(1) of
    nf4_matmul_kernels.cc)."""
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), full_env.get("PYTHONPATH", "")]
    )
    full_env["TF_CPP_VMODULE"] = "nf4_matmul_kernels=1"
    full_env["TF_CPP_MIN_LOG_LEVEL"] = "0"
    return subprocess.run(
        [sys.executable, script, mode],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
