"""The CUDA toolchain of the op library: nvcc, target GPUs, flags.

`config()` says whether CUDA kernels can be built here and how (nvcc found
in `$KERAS_QLORA_NVCC`, PATH, `$CUDA_HOME/bin` or `/usr/local/cuda/bin`;
architectures from `$KERAS_QLORA_CUDA_ARCHS`, else this machine's GPUs,
else "80;90"); `gencode_flags()` turns architectures into nvcc targets.

Standard library only: `keras_qlora.ops.build` uses it, and the GPU harness
(benchmarks/gpu/) loads it by path on machines without TensorFlow.
"""

import functools
import os
import pathlib
import re
import shutil
import subprocess

DEFAULT_ARCHS = "80;90"
# Hidden visibility: the C ABI functions are exported explicitly
# (KQ_NF4_EXPORT in nf4_cuda.h) and nothing else.
NVCC_FLAGS = (
    "-std=c++17",
    "-O3",
    "-Xcompiler",
    "-fPIC,-fvisibility=hidden,-ffp-contract=off",
)


@functools.cache
def config(archs_text: str = None) -> dict:
    if os.environ.get("KERAS_QLORA_CUDA") == "0":
        return dict(enabled=False, reason="KERAS_QLORA_CUDA=0 is set")
    nvcc = find_nvcc()
    if nvcc is None:
        return dict(
            enabled=False,
            reason="nvcc not found in $KERAS_QLORA_NVCC, PATH, "
            "$CUDA_HOME/bin or /usr/local/cuda/bin",
        )
    source = "given"
    if archs_text is None:
        archs_text = os.environ.get("KERAS_QLORA_CUDA_ARCHS")
        source = "KERAS_QLORA_CUDA_ARCHS"
    if archs_text is None:
        # Compiling costs ~11 s of CPU per architecture: build for the GPUs
        # this machine has; without one (CI), for both default targets.
        archs_text = detected_archs()
        source = "this machine's GPUs"
    if archs_text is None:
        archs_text, source = DEFAULT_ARCHS, "default"
    try:
        archs = parse_archs(archs_text)
        version = nvcc_version(nvcc)
        lib_dir = cudart_static_dir(nvcc)
    except (OSError, ValueError, subprocess.SubprocessError) as err:
        return dict(enabled=False, reason=str(err))
    names = ", ".join(f"sm_{a}" for a in archs)
    return dict(
        enabled=True,
        reason=f"nvcc {version}: {names} + PTX compute_{archs[-1]}, "
        f"architectures: {source}",
        nvcc=nvcc,
        version=version,
        archs=archs,
        lib_dir=lib_dir,
    )


def cache_key(config: dict) -> dict:
    if not config["enabled"]:
        return {"enabled": False}
    return {k: config[k] for k in ("enabled", "version", "archs")} | {
        "flags": list(NVCC_FLAGS)
    }


def arch_text(archs) -> str:
    if archs is None:
        return None
    return ";".join(str(a) for a in archs)


def find_nvcc():
    explicit = os.environ.get("KERAS_QLORA_NVCC")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


def detected_archs():
    """'90' etc. for the GPUs nvidia-smi lists (>= 8.0), or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        proc = subprocess.run(
            [smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    caps = set()
    for line in proc.stdout.split() if proc.returncode == 0 else []:
        major, _, minor = line.strip().partition(".")
        if major.isdigit() and minor.isdigit():
            caps.add(int(major) * 10 + int(minor))
    caps = sorted(c for c in caps if c >= 80)
    return ";".join(map(str, caps)) if caps else None


def parse_archs(text: str) -> list:
    """'80;90' -> [80, 90] (sorted); tensor-core kernels need >= 80."""
    parts = [p for p in re.split(r"[;, ]+", text.strip()) if p]
    try:
        archs = sorted({int(p) for p in parts})
    except ValueError:
        archs = []
    if not archs or archs[0] < 80:
        raise ValueError(
            "KERAS_QLORA_CUDA_ARCHS must list compute capabilities >= 80 "
            "(the kernels use bf16 mma.sync), e.g. '80;90'. Received: "
            f"KERAS_QLORA_CUDA_ARCHS={text!r}"
        )
    return archs


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run(
        [nvcc, "--version"], capture_output=True, text=True, timeout=60
    ).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    if match is None:
        raise ValueError(f"cannot read the version of {nvcc}: {out[-300:]!r}")
    return match.group(1)


def cudart_static_dir(nvcc: str) -> str:
    """The folder of libcudart_static.a, from nvcc's own library paths."""
    proc = subprocess.run(
        [nvcc, "--dryrun", "-x", "cu", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
        timeout=60,
    )
    dirs = re.findall(r'-L"?([^"\s]+)"?', proc.stdout + proc.stderr)
    root = pathlib.Path(nvcc).resolve().parent.parent
    dirs += [str(root / "lib64"), str(root / "targets/x86_64-linux/lib")]
    for d in dirs:
        if os.path.isfile(os.path.join(d, "libcudart_static.a")):
            return d
    raise ValueError(f"libcudart_static.a not found next to {nvcc}: {dirs}")


def gencode_flags(archs: list) -> list:
    """Machine code for each arch, PTX of the newest for later GPUs."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs[:-1]]
    last = archs[-1]
    flags.append(
        f"-gencode=arch=compute_{last},code=[sm_{last},compute_{last}]"
    )
    return flags
