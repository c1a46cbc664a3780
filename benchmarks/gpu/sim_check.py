"""The CUDA kernels' own source on the CPU, under a sanitizer. No GPU.

Builds the simulator (custom_ops/testing/cuda_sim/: the .cu kernels compiled
by g++ against a host stand-in for CUDA) with every CUDA thread as an OS
thread and `-fsanitize=thread` or `-fsanitize=address`, then runs a few
harness cases that cover every kernel (GEMV forward / transposed with
split-K, the tensor-core kernel in each dtype with split-K, the reference
kernel) and base format (nf4, fp4, int8) with that sanitizer preloaded:

- thread: a data race on shared memory or on the output / workspace between
  threads that no __syncthreads or warp operation orders (the barriers are
  mutexes and condition variables, which ThreadSanitizer understands);
- address: an out-of-bounds read or write of a global buffer (the weights,
  scales and outputs are exact-size host allocations) or of a __shared__
  array.

`--sanitizer none` runs the same cases on the default fiber build.

Usage:
    python benchmarks/gpu/sim_check.py --sanitizer thread|address|none
        [--cuda-dir DIR] [--build-dir DIR]

Prints one line per case and `SIM CHECK: PASS` / `FAIL`; exits non-zero on
a failure or a sanitizer report. `--cuda-dir` builds another copy of
custom_ops/cuda (the tests use it to show that broken kernels are caught).
"""

import argparse
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build as gpu_build  # noqa: E402

# (m, k, n, block, double quant, transpose, dtype, algo, tf32, misaligned
# x, quant type): the harness's case tuple (cases.py). SM count 4: these
# shapes split the reduction (several partial sums and the finalize kernel).
CASES = [
    (3, 512, 40, 64, True, False, "float32", "gemv", True, False, "nf4"),
    (2, 128, 1200, 32, False, True, "bfloat16", "gemv", True, False, "nf4"),
    (4, 96, 24, 128, True, True, "float16", "gemv", True, False, "nf4"),
    (20, 1024, 136, 64, True, False, "bfloat16", "mma", True, False, "nf4"),
    (33, 96, 40, 64, False, True, "float16", "mma", True, False, "nf4"),
    (17, 256, 24, 256, True, False, "float32", "mma", True, True, "nf4"),
    (2, 33, 17, 64, True, False, "float32", "reference", True, False, "nf4"),
    (3, 40, 24, 32, True, True, "bfloat16", "reference", True, False, "nf4"),
    # fp4 (nf4's kernels, its own table); int8 on the reference kernel
    # (K % 16 != 0) and on the tensor-core kernel (split-K, and transposed).
    (3, 512, 40, 64, True, False, "bfloat16", "gemv", True, False, "fp4"),
    (20, 96, 40, 32, False, True, "float32", "mma", True, False, "fp4"),
    (5, 70, 24, 70, False, True, "float16", "auto", True, False, "int8"),
    (20, 1008, 72, 1008, False, False, "bfloat16", "auto", True, False)
    + ("int8",),
    (17, 240, 40, 240, False, True, "float32", "mma", True, False, "int8"),
]
SANITIZER_OPTIONS = {
    "thread": ("TSAN_OPTIONS", "halt_on_error=1 report_signal_unsafe=0"),
    "address": (
        "ASAN_OPTIONS",
        "detect_leaks=0 halt_on_error=1 abort_on_error=1",
    ),
}


def runtime_library(sanitizer: str) -> str:
    """Path of the sanitizer's runtime (libtsan.so / libasan.so) of g++."""
    compiler = os.environ.get("CXX", "g++")
    name = {"thread": "libtsan.so", "address": "libasan.so"}[sanitizer]
    out = subprocess.run(
        [compiler, f"-print-file-name={name}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not os.path.isabs(out):
        raise RuntimeError(f"{compiler} has no {name} (found {out!r})")
    return out


def run_cases(lib_path: str) -> int:
    """Runs CASES on the simulator library in this process."""
    import harness
    from cases import StateCache
    from nf4_abi import CudaNf4
    from nf4_abi import load_quantizers

    harness.DEVICE = "cpu"
    sm_count = int(os.environ.setdefault("KQ_SIM_SM_COUNT", "4"))
    lib = CudaNf4(lib_path)
    states = StateCache(load_quantizers(), "cpu")
    failures = 0
    for case in CASES:
        start = time.perf_counter()
        problems, notes = harness.run_case(lib, None, states, sm_count, case)
        failures += bool(problems)
        print(
            f"{case} {notes.get('plan')} err={notes.get('err', 0):.3g} "
            f"{'; '.join(problems) or 'ok'} "
            f"({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    print(f"SIM CHECK: {'PASS' if not failures else f'FAIL ({failures})'}")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sanitizer", choices=("thread", "address", "none"), default="none"
    )
    parser.add_argument("--cuda-dir", default=str(gpu_build.CUDA_DIR))
    parser.add_argument("--build-dir", default="/tmp/kq_nf4_sim")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args(argv)
    if args.run:
        return run_cases(args.run)
    sanitizer = None if args.sanitizer == "none" else args.sanitizer
    start = time.perf_counter()
    lib = gpu_build.build_simulator(
        pathlib.Path(args.build_dir), sanitizer, args.cuda_dir
    )
    print(f"built {lib} in {time.perf_counter() - start:.1f} s", flush=True)
    env = dict(os.environ)
    if sanitizer:  # the runtime must be loaded before the Python binary's
        env["LD_PRELOAD"] = runtime_library(sanitizer)
        key, value = SANITIZER_OPTIONS[sanitizer]
        env[key] = value
    child = [sys.executable, __file__, "--run", str(lib)]
    return subprocess.run(child, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
