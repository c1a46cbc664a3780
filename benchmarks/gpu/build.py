"""Builds the CUDA NF4 C ABI library (and the CPU emulator) for the harness.

Runs where there is nvcc but maybe no TensorFlow or Keras (the GPU machine):
it loads keras_qlora/ops/build.py by path (that module imports only the
standard library at top level), so the nvcc flags, architectures and link
line are exactly the op library's. The emulator
(custom_ops/testing/cuda_emulator/) is built with g++ when one is found.

Usage:
    python benchmarks/gpu/build.py [--archs 90] [--out build/gpu]

Prints the paths it wrote; exits non-zero when the C ABI library fails to
build.
"""

import argparse
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
ABI_NAME = "libkq_nf4_cuda.so"
EMULATOR_NAME = "libkq_nf4_emulator.so"
SIMULATOR_NAME = "libkq_nf4_sim.so"
CUDA_DIR = REPO / "custom_ops" / "cuda"
# The CPU stand-ins for CUDA, relative to a custom_ops/ folder (not shipped
# in wheels; see keras_qlora/ops/build.py).
EMULATOR_DIR = pathlib.Path("testing", "cuda_emulator")
SIM_DIR = pathlib.Path("testing", "cuda_sim")


def load_library_module():
    """keras_qlora/ops/build.py as a standalone module (no package)."""
    path = REPO / "keras_qlora" / "ops" / "build.py"
    spec = importlib.util.spec_from_file_location("_kq_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_abi(out_dir: pathlib.Path, archs) -> pathlib.Path:
    library = load_library_module()
    return library.build_cuda_abi_library(out_dir / ABI_NAME, archs=archs)


def build_emulator(out_dir: pathlib.Path):
    """The CPU emulator, or None when no C++ compiler is found."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return None
    sources = sorted((REPO / "custom_ops" / EMULATOR_DIR).glob("*.cc"))
    out = out_dir / EMULATOR_NAME
    tmp = out.with_suffix(".tmp.so")
    cmd = [
        compiler,
        "-std=c++17",
        "-O2",
        "-shared",
        "-fPIC",
        "-ffp-contract=off",
        "-fvisibility=hidden",
        *map(str, sources),
        "-o",
        str(tmp),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"emulator build failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    os.replace(tmp, out)
    return out


def _compile(cmd, out: pathlib.Path, what: str) -> pathlib.Path:
    """Runs a compiler command that writes `out` (atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    proc = subprocess.run(
        [*cmd, "-o", str(tmp)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{what} build failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)
    return out


def simulator_command(sanitizer=None, cuda_dir=CUDA_DIR) -> list:
    """g++ arguments (without -o) that compile the kernels' own .cu sources
    and the CUDA stand-in (custom_ops/testing/cuda_sim/) into a host library
    with the C ABI of nf4_cuda.h. `sanitizer`: None, "thread" or "address";
    `cuda_dir`: a copy of custom_ops/cuda (tests build altered kernels),
    next to its include/ and testing/ folders."""
    cuda_dir = pathlib.Path(cuda_dir)
    sim_dir = cuda_dir.parent / SIM_DIR
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"no C++ compiler ({compiler}) to build the simulator"
        )
    cmd = [
        compiler,
        "-std=c++17",
        "-O1" if sanitizer else "-O2",
        "-g",
        "-DKQ_CUDA_SIM",
        "-fPIC",
        "-pthread",
        "-ffp-contract=off",
        "-Wall",
        "-Werror",
        "-Wno-unknown-pragmas",
        f"-I{cuda_dir}",
        f"-I{sim_dir}",  # cuda_sim.h, in place of the CUDA headers
    ]
    if sanitizer:  # OS threads, whose ordering the sanitizers see
        cmd += [
            f"-fsanitize={sanitizer}",
            "-fno-omit-frame-pointer",
            "-DKQ_SIM_THREADS",
        ]
    kernels = sorted(cuda_dir.glob("*.cu"))
    runtime = sorted(sim_dir.glob("*.cc"))
    return [
        *cmd,
        "-x",
        "c++",
        *map(str, kernels),
        "-x",
        "none",
        *map(str, runtime),
    ]


def build_simulator(
    out_dir: pathlib.Path, sanitizer=None, cuda_dir=CUDA_DIR
) -> pathlib.Path:
    """The kernels on the host as a shared library (harness --simulate,
    sim_check.py); named after the sanitizer, if any."""
    cmd = simulator_command(sanitizer, cuda_dir)
    cmd += ["-shared", "-fvisibility=hidden"]
    name = SIMULATOR_NAME
    if sanitizer:
        name = name.replace(".so", f"_{sanitizer}.so")
    return _compile(cmd, pathlib.Path(out_dir) / name, "simulator")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archs",
        default="90",
        help="compute capabilities, e.g. '90' or '80;90'",
    )
    parser.add_argument("--out", default=str(REPO / "build" / "gpu"))
    args = parser.parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    archs = [int(a) for a in args.archs.replace(",", ";").split(";") if a]
    start = time.perf_counter()
    try:
        abi = build_abi(out_dir, archs)
    except RuntimeError as err:
        print(f"C ABI library build failed: {err}", file=sys.stderr)
        return 1
    print(f"built {abi} (sm_{archs}) in {time.perf_counter() - start:.1f} s")
    emulator = build_emulator(out_dir)
    print(f"emulator: {emulator or 'not built (no g++)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
