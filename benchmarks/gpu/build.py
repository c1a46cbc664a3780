"""Builds the CUDA NF4 C ABI library (and the CPU emulator) for the harness.

Runs where there is nvcc but maybe no TensorFlow or Keras (the GPU machine):
it loads keras_qlora/ops/_library.py by path (that module imports only the
standard library at top level), so the nvcc flags, architectures and link
line are exactly the op library's. The emulator (custom_ops/cuda/host/) is
built with g++ when one is found.

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


def load_library_module():
    """keras_qlora/ops/_library.py as a standalone module (no package)."""
    path = REPO / "keras_qlora" / "ops" / "_library.py"
    spec = importlib.util.spec_from_file_location("_kq_library", path)
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
    sources = sorted((REPO / "custom_ops" / "cuda" / "host").glob("*.cc"))
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
