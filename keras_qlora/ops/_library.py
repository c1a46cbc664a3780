"""Building and loading the fused NF4 op library (`_nf4_ops.so`), lazily.

Importing keras_qlora never fails because the library is missing. The first
`load()` looks for, in order:

1. a library built at install time next to this file (`_nf4_ops.so`), if
   its stamp matches the sources and the running TensorFlow;
2. a cached build in `$KERAS_QLORA_CACHE` (default
   `~/.cache/keras_qlora`), keyed by a hash of the sources, the TensorFlow
   version and the compiler flags;
3. otherwise it compiles the sources with the system g++ into that cache,
   under a file lock, writing to a temporary file that is renamed into place
   (so concurrent processes never load a half-written library).

If that fails, or `KERAS_QLORA_PURE_TF=1`, `load()` returns None and
`status()` says why; callers then use the pure-TF path. A process loads the
library at most once (TensorFlow refuses a second copy of the same kernels).
"""

import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

LIBRARY_NAME = "_nf4_ops.so"
STAMP_NAME = "_nf4_ops.json"
# -ffp-contract=off: no fused multiply-add contraction, so that the C++
# quantizer rounds exactly like the numpy reference.
CXX_FLAGS = (
    "-shared",
    "-fPIC",
    "-O3",
    "-ffp-contract=off",
    "-Wno-deprecated-declarations",
)

_lock = threading.Lock()
_state = {"module": None, "tried": False, "path": None, "reason": None}


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


def source_files() -> list:
    return sorted(source_dir().rglob("*.cc"))


def build_key() -> str:
    """Hash of everything the library depends on."""
    import tensorflow as tf

    digest = hashlib.sha256()
    root = source_dir()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".cc", ".h"):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    digest.update(tf.__version__.encode())
    digest.update(" ".join(_tf_flags() + list(CXX_FLAGS)).encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()[:20]


def cache_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "keras_qlora"
    return pathlib.Path(os.environ.get("KERAS_QLORA_CACHE", default))


def build(output: pathlib.Path, verbose: bool = False) -> pathlib.Path:
    """Compiles all sources into `output` (atomically); returns the path.

    Each .cc file compiles in its own process (they take seconds each with
    TensorFlow's headers), then one link step writes a temporary file that is
    renamed onto `output`.
    """
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"no C++ compiler ('{compiler}') on PATH; install g++ to build "
            "the fused op"
        )
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compile_flags, link_flags = _tf_flags(split=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        objects, procs = [], []
        for i, src in enumerate(source_files()):
            obj = os.path.join(tmp, f"{i}_{src.stem}.o")
            cmd = [compiler, "-c", *CXX_FLAGS[1:], *compile_flags, str(src)]
            cmd += ["-o", obj]
            procs.append(
                (
                    src,
                    subprocess.Popen(
                        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                    ),
                )
            )
            objects.append(obj)
        for src, proc in procs:
            out = proc.communicate()[0].decode(errors="replace")
            if proc.returncode != 0:
                raise RuntimeError(
                    f"compiling {src.name} failed:\n{out[-4000:]}"
                )
            if verbose and out.strip():
                print(out, file=sys.stderr)
        tmp_lib = os.path.join(tmp, LIBRARY_NAME)
        cmd = [compiler, *CXX_FLAGS, *objects, "-o", tmp_lib, *link_flags]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"linking failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp_lib, output)
    return output


def load():
    """Returns the loaded op module, or None (see `status()` for why)."""
    with _lock:
        if _state["tried"]:
            return _state["module"]
        _state["tried"] = True
        if os.environ.get("KERAS_QLORA_PURE_TF") == "1":
            _state["reason"] = "KERAS_QLORA_PURE_TF=1 is set"
            return None
        try:
            path = _find_or_build()
            import tensorflow as tf

            _state["module"] = tf.load_op_library(str(path))
            _state["path"] = str(path)
        except Exception as err:  # any failure means: use the pure path
            _state["reason"] = f"{type(err).__name__}: {err}"
        return _state["module"]


def status() -> dict:
    """What `load()` found: module loaded, library path, or the reason."""
    return dict(
        loaded=_state["module"] is not None,
        tried=_state["tried"],
        path=_state["path"],
        reason=_state["reason"],
    )


def mark_failed(reason: str):
    """Records that the loaded library must not be used, and why."""
    with _lock:
        _state["reason"] = reason
        _state["path"] = None
        _state["module"] = None


def write_prebuilt(package_ops_dir: pathlib.Path) -> pathlib.Path:
    """Builds the library into the package with a stamp (install time)."""
    package_ops_dir = pathlib.Path(package_ops_dir)
    path = build(package_ops_dir / LIBRARY_NAME)
    _atomic_write(
        package_ops_dir / STAMP_NAME, json.dumps({"key": build_key()})
    )
    return path


def _find_or_build() -> pathlib.Path:
    key = build_key()
    here = pathlib.Path(__file__).resolve().parent
    prebuilt, stamp = here / LIBRARY_NAME, here / STAMP_NAME
    if prebuilt.exists() and stamp.exists():
        try:
            if json.loads(stamp.read_text()).get("key") == key:
                return prebuilt
        except (OSError, ValueError):
            pass
    target = cache_dir() / key / LIBRARY_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "build.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if not target.exists():  # another process may have built it
                print(
                    "keras_qlora: building the fused NF4 op (once per "
                    f"TensorFlow version) into {target.parent} ...",
                    file=sys.stderr,
                )
                build(target)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return target


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
