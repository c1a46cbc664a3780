"""The CUDA kernels' own source, run on the CPU (no GPU needed).

custom_ops/testing/cuda_sim/ compiles the .cu kernels with g++ against a host
stand-in for CUDA (blocks, __syncthreads, warp shuffles, mma.sync from the
PTX ISA fragment tables). These tests run, through the C ABI:

- the GPU harness's correctness part (`harness.py --simulate`: every kernel,
  dtype, both products, split-K, misaligned x, every base format (nf4;
  fp4, nf4's kernels with its own table; int8, K not a power of two, on
  the tensor-core and reference kernels); float64 reference, NaN poisoned
  outputs, a second run with the blocks and threads in reverse order, and
  the CPU emulator, which must match the GEMV and reference kernels bit for
  bit);
- a few cases under ThreadSanitizer (every CUDA thread an OS thread) and
  AddressSanitizer (`sim_check.py`);
- broken copies of the kernels, to show that each of those checks catches
  what it is for: a missing __syncthreads, a wrong mma fragment index, an
  out-of-bounds read, a divergent barrier, the NF4 table used for fp4 and
  int8 bytes read as unsigned.

The sanitizer tests skip when g++ lacks its sanitizer runtimes, unless
KERAS_QLORA_REQUIRE_SANITIZERS=1 (CI sets it; then they fail).
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
GPU_DIR = REPO / "benchmarks" / "gpu"
SOURCES = REPO / "custom_ops"
SIM_CHECK_CASES = 13  # len(benchmarks/gpu/sim_check.py CASES)


def _gxx():
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        pytest.fail(f"no C++ compiler ({compiler}): the op library needs one")
    return compiler


def _require_sanitizer(name: str):
    compiler = _gxx()
    runtime = {"thread": "libtsan.so", "address": "libasan.so"}[name]
    found = subprocess.run(
        [compiler, f"-print-file-name={runtime}"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if os.path.isabs(found):
        return
    message = f"{compiler} has no {runtime}"
    if os.environ.get("KERAS_QLORA_REQUIRE_SANITIZERS") == "1":
        pytest.fail(message + " (KERAS_QLORA_REQUIRE_SANITIZERS=1)")
    pytest.skip(message)


def _run(script: str, *args, timeout=600):
    proc = subprocess.run(
        [sys.executable, str(GPU_DIR / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "OUT"},
    )
    return proc.returncode, proc.stdout + proc.stderr


def _sim_check(tmp_path, sanitizer="none", cuda_dir=None):
    args = ["--sanitizer", sanitizer, "--build-dir", tmp_path / "build"]
    if cuda_dir is not None:
        args += ["--cuda-dir", cuda_dir]
    return _run("sim_check.py", *args)


def _broken_copy(tmp_path, file: str, old: str, new: str) -> pathlib.Path:
    """A copy of custom_ops/ with `old` replaced by `new` once in
    custom_ops/cuda/`file`; returns the copy's cuda directory."""
    root = tmp_path / "custom_ops"
    for part in ("cuda", "kernels", "include", "testing"):
        shutil.copytree(SOURCES / part, root / part)
    path = root / "cuda" / file
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not unique in {file}"
    path.write_text(text.replace(old, new))
    return root / "cuda"


# ---------------------------------------------------------------- kernels


def test_harness_correctness_passes_on_the_simulated_kernels(tmp_path):
    _gxx()
    rc, out = _run("harness.py", "--simulate", "--build-dir", tmp_path)
    assert rc == 0, out[-3000:]
    assert "CORRECTNESS VERDICT: PASS" in out, out[-3000:]
    cases = int(re.search(r"== correctness: (\d+) cases", out).group(1))
    assert cases >= 100, out[-3000:]
    # The emulator (custom_ops/testing/cuda_emulator/) is a separate
    # implementation of the same arithmetic: it must equal the real kernel
    # code bit for bit.
    exact, compared = map(
        int,
        re.search(r"bit-exact \(gemv/reference\): (\d+)/(\d+)", out).groups(),
    )
    assert compared >= 60 and exact == compared, out[-3000:]
    for dtype in ("float32", "bfloat16", "float16"):
        for algo in ("gemv", "mma", "reference"):
            assert re.search(rf"worst error {dtype}\s+{algo}\s", out), (
                f"no {dtype} {algo} case ran\n{out[-3000:]}"
            )
    # Every base format ran, and matched the emulator bit for bit.
    for quant_type, at_least in (("nf4", 60), ("fp4", 40), ("int8", 40)):
        cases = re.search(rf"format {quant_type}\s+(\d+) cases", out)
        assert cases and int(cases.group(1)) >= at_least, out[-3000:]
        same = re.search(rf"{quant_type} (\d+)/(\d+)[,)]", out)
        assert same and same.group(1) == same.group(2), out[-3000:]
        assert int(same.group(2)) >= at_least // 2, out[-3000:]


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_sanitizers_find_nothing_in_the_kernels(tmp_path, sanitizer):
    _require_sanitizer(sanitizer)
    rc, out = _sim_check(tmp_path, sanitizer)
    assert rc == 0, out[-4000:]
    assert "SIM CHECK: PASS" in out
    assert "Sanitizer" not in out, out[-4000:]
    assert out.count(" ok (") == SIM_CHECK_CASES, out[-4000:]


# ---------------------------------------------------------------- the checks


def test_a_missing_syncthreads_is_caught(tmp_path):
    """The transposed GEMV sums its 8 warps' partials in shared memory, one
    warp after the other, with a barrier between turns. Without it (one
    barrier after the loop instead), thread order 0..255 still gives the
    right sum, but the harness's second run, in reverse order, does not;
    ThreadSanitizer reports the race."""
    cuda_dir = _broken_copy(
        tmp_path,
        "nf4_cuda_gemv.cu",
        "acc[i][e];\n    }\n    __syncthreads();\n  }",
        "acc[i][e];\n    }\n  }\n  __syncthreads();",
    )
    rc, out = _sim_check(tmp_path / "fibers", "none", cuda_dir)
    assert rc != 0 and "SIM CHECK: FAIL" in out, out[-3000:]
    lines = [line for line in out.splitlines() if "'gemv'" in line]
    transposed = [line for line in lines if "True, 'bfloat16', 'gemv'" in line]
    assert transposed and "two runs differ bitwise" in transposed[0], out
    assert all(" ok (" in line for line in lines if "False, 'float32'" in line)

    _require_sanitizer("thread")
    rc, out = _sim_check(tmp_path / "tsan", "thread", cuda_dir)
    assert rc != 0 and "ThreadSanitizer: data race" in out, out[-3000:]
    assert "GemvTransposeKernel" in out, out[-3000:]


def test_a_wrong_mma_fragment_index_is_caught(tmp_path):
    """The simulated mma.sync gathers A and B from the PTX ISA's fragment
    tables, independently of the kernel's own FragBOffset: a kernel that
    loads B's second register from the wrong k gives wrong products."""
    cuda_dir = _broken_copy(
        tmp_path,
        "nf4_cuda_math.h",
        "const int k = C::kTf32 ? t + 4 * r : 2 * t + 8 * r;",
        "const int k = C::kTf32 ? t + 4 * r : 2 * t + 4 * r;",
    )
    rc, out = _sim_check(tmp_path, "none", cuda_dir)
    assert rc != 0, out[-3000:]
    mma = [
        line
        for line in out.splitlines()
        if "'mma')" in line or "'mma'," in line
    ]
    bad = [line for line in mma if "error " in line and " ok (" not in line]
    # bf16 and f16 cases fail; the float32 (TF32) path is untouched.
    assert any("'bfloat16'" in line for line in bad), out[-3000:]
    assert any("'float16'" in line for line in bad), out[-3000:]
    assert all("'float32'" not in line for line in bad), out[-3000:]


def test_an_out_of_bounds_read_is_caught(tmp_path):
    """The reference kernel reading one element past the end of its
    reduction reads past the packed weights: AddressSanitizer reports it."""
    _require_sanitizer("address")
    cuda_dir = _broken_copy(
        tmp_path,
        "nf4_cuda_reference.cu",
        "for (int64_t r = lane; r < red; r += 32)",
        "for (int64_t r = lane; r <= red; r += 32)",
    )
    rc, out = _sim_check(tmp_path, "address", cuda_dir)
    assert rc != 0, out[-3000:]
    assert "AddressSanitizer" in out and "buffer-overflow" in out, out[-3000:]
    assert "ReferenceKernel" in out, out[-3000:]


def test_a_divergent_barrier_is_reported_not_hung(tmp_path):
    """__syncthreads that one warp skips would hang or be undefined on a
    GPU; the simulator reports the deadlock and aborts."""
    cuda_dir = _broken_copy(
        tmp_path,
        "nf4_cuda_mma.cu",
        "      StoreStage<T, C, I8>(a, stage, tables, as[buf ^ 1], "
        "bs[buf ^ 1]);\n    __syncthreads();",
        "      StoreStage<T, C, I8>(a, stage, tables, as[buf ^ 1], "
        "bs[buf ^ 1]);\n    if (warp != 0) __syncthreads();",
    )
    rc, out = _sim_check(tmp_path, "none", cuda_dir)
    assert rc != 0, out[-3000:]
    assert "kqsim: deadlock in block" in out, out[-3000:]
    assert "__syncthreads" in out, out[-3000:]


def test_fp4_read_with_the_nf4_table_is_caught(tmp_path):
    """fp4 runs nf4's kernels with its own code table; a block that loads
    the NF4 table instead gives wrong fp4 products and right nf4 ones."""
    cuda_dir = _broken_copy(
        tmp_path,
        "nf4_cuda_device.cuh",
        "a.quant_type == KQ_NF4_QUANT_FP4 ? 1 : 0;",
        "a.quant_type == KQ_NF4_QUANT_FP4 ? 0 : 0;",
    )
    rc, out = _sim_check(tmp_path, "none", cuda_dir)
    assert rc != 0 and "SIM CHECK: FAIL" in out, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("(")]
    fp4 = [line for line in lines if "'fp4')" in line]
    assert fp4 and all("error " in line for line in fp4), out[-3000:]
    assert all(" ok (" in line for line in lines if "'fp4')" not in line)


@pytest.mark.parametrize(
    "file, old, new, algo",
    [
        (
            "nf4_cuda_device.cuh",
            "static_cast<int8_t>(__ldg(a.packed + flat))",
            "static_cast<uint8_t>(__ldg(a.packed + flat))",
            "reference",
        ),
        (
            "nf4_cuda_math.h",
            "static_cast<int8_t>(static_cast<uint8_t>(word >> (8 * b)))",
            "static_cast<uint8_t>(word >> (8 * b))",
            "mma",
        ),
    ],
    ids=["reference", "mma"],
)
def test_int8_read_as_unsigned_is_caught(tmp_path, file, old, new, algo):
    """int8 codes are two's complement bytes: read as uint8 (by the
    reference kernel, or by the tensor-core kernel's decoder), every
    negative weight becomes a large positive one."""
    cuda_dir = _broken_copy(tmp_path, file, old, new)
    rc, out = _sim_check(tmp_path, "none", cuda_dir)
    assert rc != 0 and "SIM CHECK: FAIL" in out, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("(")]
    broken = [
        line for line in lines if "'int8')" in line and f" {algo}/" in line
    ]
    assert broken and all("error " in line for line in broken), out[-3000:]
    assert all(" ok (" in line for line in lines if line not in broken)
