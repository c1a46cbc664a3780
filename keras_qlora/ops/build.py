"""The build system of the fused NF4 op library (`_nf4_ops.so`).

Compiler invocation, cache key and atomic cache writes; loading the library
into TensorFlow is `keras_qlora.ops.loader`'s job. `find_or_build()` looks
for, in order:

1. a library built at install time next to this file (`_nf4_ops.so`), if
   its stamp matches the sources, the toolchain and the running TensorFlow;
2. a cached build in `$KERAS_QLORA_CACHE` (default
   `~/.cache/keras_qlora`), keyed by a hash of the sources, the TensorFlow
   version, the compiler flags and the CUDA configuration;
3. otherwise it compiles the sources into that cache, under a file lock,
   writing to a temporary file that is renamed into place (so concurrent
   processes never load a half-written library).

Every library is recorded with its size and SHA-256 (`_nf4_ops.json`,
written atomically after the library) and checked against that record
before it is returned: a truncated or replaced file (loading one can kill
the process with SIGBUS inside `tf.load_op_library`) is rebuilt, or, if
that fails, the pure TensorFlow path runs. A CUDA build that failed for a
reason that may pass (disk full, a killed compiler, out of memory) is
retried by the next process instead of leaving a CPU-only library cached
under the CUDA-enabled key for good.

CUDA: when nvcc is found (`$KERAS_QLORA_NVCC`, PATH, `$CUDA_HOME/bin`,
`/usr/local/cuda/bin`) and `KERAS_QLORA_CUDA` is not "0", the kernels of
`custom_ops/cuda/*.cu` are compiled with nvcc for `$KERAS_QLORA_CUDA_ARCHS`
(e.g. "80;90"), else for the GPUs nvidia-smi lists, else for "80;90"
(machine code for each, plus PTX of the newest for later GPUs), kept as
`libkq_nf4_cuda.a` next to the library, and linked into the
same library with the static CUDA runtime, whose symbols stay hidden
(`-Wl,--exclude-libs,ALL`), together with the GPU OpKernel (built with
GOOGLE_CUDA=1). Without nvcc the library holds the CPU kernels only;
`cuda_status()` and `python -m keras_qlora.ops --info` say which.

`custom_ops/testing/` (CPU stand-ins for CUDA, used by tests and the GPU
harness only) is neither compiled into the library nor part of its key.

This module and `cuda_toolchain` (nvcc, architectures, flags) import only
the standard library at top level (TensorFlow lazily): setup.py and the GPU
harness (benchmarks/gpu/) load this file by path, the harness on a machine
without TensorFlow, to build the standalone CUDA C ABI library.
"""

import fcntl
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile


def _load_sibling(name: str):
    """A module next to this file, for when this file is loaded by path."""
    path = pathlib.Path(__file__).resolve().with_name(name + ".py")
    spec = importlib.util.spec_from_file_location(f"_kq_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __package__:
    from keras_qlora.ops import cuda_toolchain
else:  # loaded by path (setup.py, benchmarks/gpu/): no package around
    cuda_toolchain = _load_sibling("cuda_toolchain")

LIBRARY_NAME = "_nf4_ops.so"
STAMP_NAME = "_nf4_ops.json"
CUDA_ARCHIVE_NAME = "libkq_nf4_cuda.a"
CUDA_ERROR_NAME = "cuda_build_error.txt"
# -ffp-contract=off: no fused multiply-add contraction, so that the C++
# quantizer rounds exactly like the numpy reference.
CXX_FLAGS = (
    "-shared",
    "-fPIC",
    "-O3",
    "-ffp-contract=off",
    "-Wno-deprecated-declarations",
)
# The static CUDA runtime needs these system libraries.
CUDART_LIBS = ("-l:libcudart_static.a", "-ldl", "-lrt", "-lpthread")

# Sources under this folder of custom_ops/ are test stand-ins, not the op.
TESTING_DIR = "testing"


def source_dir() -> pathlib.Path:
    """The folder of the C++ sources (shipped in wheels, or the repo's)."""
    here = pathlib.Path(__file__).resolve().parent
    for candidate in (
        here.parent / "_custom_ops",
        here.parents[1] / "custom_ops",
    ):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "The keras_qlora C++ sources (custom_ops/) are not installed next to "
        f"the package ({here.parents[1]})."
    )


def copy_sources(source: pathlib.Path, target: pathlib.Path) -> list:
    """Copies the op's sources to `target` (a wheel's `_custom_ops`).

    Everything but `testing/` (the CPU stand-ins for CUDA): a wheel carries
    what the library is built from, and nothing else.

    Returns:
        The copied files, relative to `target`, sorted.
    """
    source, target = pathlib.Path(source), pathlib.Path(target)
    shutil.rmtree(target, ignore_errors=True)

    def ignore(folder, names):
        at_root = pathlib.Path(folder).resolve() == source.resolve()
        return [n for n in names if at_root and n == TESTING_DIR]

    shutil.copytree(source, target, ignore=ignore)
    return sorted(
        str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()
    )


def source_files() -> list:
    """The TensorFlow op sources (.cc with TF headers), not the CUDA ones."""
    root = source_dir()
    return sorted(
        p
        for p in root.rglob("*.cc")
        if not {"cuda", TESTING_DIR} & set(p.relative_to(root).parts)
    )


def cuda_source_files() -> list:
    """The CUDA kernel sources (no TF headers): custom_ops/cuda/*.cu."""
    return sorted((source_dir() / "cuda").glob("*.cu"))


def cuda_config() -> dict:
    """How CUDA kernels would be built here (cached for the process).

    Returns:
        A dict with `enabled` (bool) and `reason` (why not, or a summary),
        and when enabled `nvcc`, `version`, `archs` (compute capabilities)
        and `lib_dir` (where `libcudart_static.a` is).
    """
    return dict(cuda_toolchain.config())


def cuda_status(library_path=None) -> str:
    """One line: whether the library has CUDA kernels, and for what.

    Args:
        library_path: the built library, whose folder may hold the error
            of a failed CUDA build; None when none is loaded.
    """
    config = cuda_toolchain.config()
    if not config["enabled"]:
        return f"not built ({config['reason']}); CPU kernels only"
    if library_path is not None:
        error_file = pathlib.Path(library_path).parent / CUDA_ERROR_NAME
        if error_file.exists():
            first = error_file.read_text().strip().splitlines()[:1]
            return (
                f"FAILED to build ({first[0] if first else 'no output'}; "
                f"see {error_file}); CPU kernels only"
            )
    return f"built ({config['reason']})"


def build_key() -> str:
    """Hash of everything the library depends on."""
    import tensorflow as tf

    config = cuda_toolchain.config()
    digest = hashlib.sha256()
    root = source_dir()
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        # A CPU-only library does not depend on custom_ops/cuda/, and no
        # library on the CUDA stand-ins of custom_ops/testing/. Shared
        # headers (custom_ops/include/) count for both.
        if "cuda" in relative.parts and not config["enabled"]:
            continue
        if relative.parts[0] == TESTING_DIR:
            continue
        if path.suffix in (".cc", ".h", ".cu", ".cuh"):
            digest.update(str(relative).encode())
            digest.update(path.read_bytes())
    digest.update(tf.__version__.encode())
    digest.update(" ".join(_tf_flags() + list(CXX_FLAGS)).encode())
    digest.update(sys.version.encode())
    digest.update(
        json.dumps(cuda_toolchain.cache_key(config), sort_keys=True).encode()
    )
    return digest.hexdigest()[:20]


def cache_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "keras_qlora"
    return pathlib.Path(os.environ.get("KERAS_QLORA_CACHE", default))


def build(output: pathlib.Path, verbose: bool = False) -> pathlib.Path:
    """Compiles all sources into `output` (atomically); returns the path.

    Every .cc (seconds each with TensorFlow's headers) and .cu file compiles
    in its own process, all at once; with CUDA the .cu objects are archived
    next to `output` (`libkq_nf4_cuda.a`); one link step writes a temporary
    file that is renamed onto `output`. If only the CUDA part fails, the
    library is built with the CPU kernels alone (the CPU path must not
    depend on a working CUDA toolchain) and the error is kept next to it
    (`cuda_build_error.txt`, reported by `cuda_status()`).
    """
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"no C++ compiler ('{compiler}') on PATH; install g++ to build "
            "the fused op"
        )
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    error_file = output.parent / CUDA_ERROR_NAME
    error_file.unlink(missing_ok=True)
    config = cuda_toolchain.config()
    try:
        return _build(output, config, compiler, verbose)
    except RuntimeError as err:
        if not config["enabled"]:
            raise
        cuda_error = str(err)
    _build(output, dict(enabled=False), compiler, verbose)
    _atomic_write(error_file, cuda_error)
    print(
        "keras_qlora: the CUDA kernels failed to build; the library has the "
        f"CPU kernels only. Error:\n{cuda_error[-2000:]}",
        file=sys.stderr,
    )
    return output


def _build(output, config, compiler, verbose) -> pathlib.Path:
    compile_flags, link_flags = _tf_flags(split=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        jobs, objects = [], []
        if config["enabled"]:
            jobs += _start_cuda_compiles(config, tmp)
        for i, src in enumerate(source_files()):
            obj = os.path.join(tmp, f"{i}_{src.stem}.o")
            cmd = [compiler, "-c", *CXX_FLAGS[1:], *compile_flags, str(src)]
            if config["enabled"] and src.stem.endswith("_gpu"):
                cmd.append("-DGOOGLE_CUDA=1")
            jobs.append((src, obj, _start(cmd + ["-o", obj])))
            objects.append(obj)
        _wait_all(jobs, verbose)
        cuda_link = []
        if config["enabled"]:
            archive = output.parent / CUDA_ARCHIVE_NAME
            _archive(
                [obj for src, obj, _ in jobs if src.suffix == ".cu"],
                archive,
                tmp,
            )
            cuda_link = [
                str(archive),
                f"-L{config['lib_dir']}",
                *CUDART_LIBS,
                "-Wl,--exclude-libs,ALL",
            ]
        tmp_lib = os.path.join(tmp, LIBRARY_NAME)
        cmd = [compiler, *CXX_FLAGS, *objects, *cuda_link, "-o", tmp_lib]
        _run(cmd + link_flags, "linking the op library")
        os.replace(tmp_lib, output)
    return output


def build_cuda_abi_library(
    output: pathlib.Path, archs=None, archive: pathlib.Path = None
) -> pathlib.Path:
    """Builds the standalone CUDA C ABI library (no TensorFlow needed).

    The GPU harness drives this library through ctypes. Only the
    `kq_nf4_*` functions of custom_ops/cuda/nf4_cuda.h are exported; the
    static CUDA runtime is linked in with its symbols hidden.

    Args:
        output: path of the shared library to write (atomically).
        archs: compute capabilities, e.g. `[90]`; default from
            `$KERAS_QLORA_CUDA_ARCHS` or "80;90".
        archive: link this prebuilt `libkq_nf4_cuda.a` (e.g. the op
            library's) instead of compiling the .cu sources.

    Returns:
        `output`.

    Raises:
        RuntimeError: nvcc is missing, or compiling or linking failed.

    Example:
    >>> build_cuda_abi_library("/tmp/libkq_nf4_cuda.so", archs=[90])
    """
    config = cuda_toolchain.config(cuda_toolchain.arch_text(archs))
    if not config["enabled"]:
        raise RuntimeError(f"cannot build CUDA kernels: {config['reason']}")
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX", "g++")
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        if archive is None:
            jobs = _start_cuda_compiles(config, tmp)
            _wait_all(jobs, verbose=False)
            archive = pathlib.Path(tmp) / CUDA_ARCHIVE_NAME
            _archive([obj for _, obj, _ in jobs], archive, tmp)
        tmp_lib = os.path.join(tmp, output.name)
        _run(
            [
                compiler,
                "-shared",
                "-fPIC",
                "-Wl,--whole-archive",
                str(archive),
                "-Wl,--no-whole-archive",
                f"-L{config['lib_dir']}",
                *CUDART_LIBS,
                "-Wl,--exclude-libs,libcudart_static.a",
                "-o",
                tmp_lib,
            ],
            "linking the CUDA C ABI library",
        )
        os.replace(tmp_lib, output)
    return output


def write_prebuilt(package_ops_dir: pathlib.Path) -> pathlib.Path:
    """Builds the library into the package with a stamp (install time)."""
    package_ops_dir = pathlib.Path(package_ops_dir)
    path = build(package_ops_dir / LIBRARY_NAME)
    # The CUDA archive is linked in already; wheels need not carry it.
    (package_ops_dir / CUDA_ARCHIVE_NAME).unlink(missing_ok=True)
    _write_record(path, build_key())
    return path


def find_or_build() -> pathlib.Path:
    """The library for this TensorFlow: prebuilt, cached, or built now.

    Raises:
        RuntimeError: no compiler, or compiling or linking failed.
    """
    key = build_key()
    here = pathlib.Path(__file__).resolve().parent
    prebuilt = here / LIBRARY_NAME
    if prebuilt.exists() and verify(prebuilt, key) is None:
        return prebuilt
    target = cache_dir() / key / LIBRARY_NAME
    if target.exists() and verify(target, key) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "build.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            # Another process may have built it meanwhile.
            problem = verify(target, key) if target.exists() else "missing"
            if problem is not None:
                if problem != "missing":
                    print(
                        f"keras_qlora: the cached op library {target} is "
                        f"not the one built ({problem}); rebuilding it.",
                        file=sys.stderr,
                    )
                (target.parent / STAMP_NAME).unlink(missing_ok=True)
                config = cuda_toolchain.config()
                what = (
                    f"with CUDA kernels: {config['reason']}"
                    if config["enabled"]
                    else f"CPU kernels only: {config['reason']}"
                )
                print(
                    "keras_qlora: building the fused NF4 op (once per "
                    f"TensorFlow version; {what}) into {target.parent} ...",
                    file=sys.stderr,
                )
                build(target)
                _write_record(target, key)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return target


def verify(library: pathlib.Path, key: str):
    """Checks `library` against its record (`_nf4_ops.json` beside it).

    Returns:
        None when its key, size and SHA-256 match the record and the build
        is final; else a short reason (no record, another key, wrong size
        or hash, a CUDA build to retry).
    """
    library = pathlib.Path(library)
    try:
        record = json.loads((library.parent / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return "no record of its build"
    if not isinstance(record, dict) or record.get("key") != key:
        return "built for other sources or another TensorFlow"
    size = library.stat().st_size
    if size != record.get("size"):
        return f"{size} bytes, {record.get('size')} were written"
    if _sha256(library) != record.get("sha256"):
        return "its SHA-256 differs from the one written"
    if record.get("retry_cuda"):
        return "its CUDA kernels failed to build for a reason that may pass"
    return None


def _write_record(library: pathlib.Path, key: str):
    """Records `library`'s key, size and SHA-256 beside it (atomically,
    after the library itself is in place)."""
    error = library.parent / CUDA_ERROR_NAME
    retry = error.exists() and bool(_TRANSIENT.search(error.read_text()))
    record = {
        "key": key,
        "size": library.stat().st_size,
        "sha256": _sha256(library),
        "retry_cuda": retry,
    }
    _atomic_write(library.parent / STAMP_NAME, json.dumps(record))


# CUDA build errors that may not happen again: retried by the next process.
_TRANSIENT = re.compile(
    r"No space left on device|Killed|signal \d+|Cannot allocate memory|"
    r"Resource temporarily unavailable|Disk quota exceeded",
    re.IGNORECASE,
)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _start_cuda_compiles(config: dict, tmp: str) -> list:
    jobs = []
    for src in cuda_source_files():
        obj = os.path.join(tmp, f"cuda_{src.stem}.o")
        cmd = [config["nvcc"], "-c", *cuda_toolchain.NVCC_FLAGS]
        cmd += cuda_toolchain.gencode_flags(config["archs"])
        cxx = os.environ.get("CXX")
        if cxx:
            cmd += ["-ccbin", cxx]
        jobs.append((src, obj, _start(cmd + [str(src), "-o", obj])))
    return jobs


def _archive(objects: list, archive: pathlib.Path, tmp: str):
    tmp_archive = os.path.join(tmp, "tmp_" + archive.name)
    _run(["ar", "rcs", tmp_archive, *objects], "archiving the CUDA objects")
    os.replace(tmp_archive, archive)


def _start(cmd: list) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _wait_all(jobs: list, verbose: bool):
    """Waits for every compile; raises with the first failure's output."""
    failure = None
    for src, _, proc in jobs:
        out = proc.communicate()[0].decode(errors="replace")
        if proc.returncode != 0 and failure is None:
            failure = f"compiling {src.name} failed:\n{out[-4000:]}"
        elif verbose and out.strip():
            print(out, file=sys.stderr)
    if failure is not None:
        raise RuntimeError(failure)


def _run(cmd: list, what: str):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-4000:]}")


def _tf_flags(split=False):
    import tensorflow as tf

    compile_flags = list(tf.sysconfig.get_compile_flags())
    link_flags = list(tf.sysconfig.get_link_flags())
    if split:
        return compile_flags, link_flags
    return compile_flags + link_flags


def _atomic_write(path: pathlib.Path, text: str):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
