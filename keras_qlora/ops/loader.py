"""Loading the fused NF4 op library lazily, and the fallback warning.

Importing keras_qlora never fails because the library is missing. The first
`load()` asks `keras_qlora.ops.build.find_or_build()` for a library (built
at install time, cached, or compiled now) and loads it into TensorFlow. If
that fails, or `KERAS_QLORA_PURE_TF=1`, `load()` returns None and `status()`
says why; callers then use the pure-TF path and `warn_fallback()` tells the
user once. A process loads the library at most once (TensorFlow refuses a
second copy of the same kernels). A bad `KERAS_QLORA_CPU_ISA` is refused
here, by every `load()`, rather than by the kernels: the matmul's self-test
would otherwise swallow the kernels' error and run the slow path.
"""

import dataclasses
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

from keras_qlora.ops import build


@dataclasses.dataclass
class LoaderState:
    """What this process knows about the op library (one per process).

    Attributes:
        module: the loaded op module, or None.
        tried: whether `load()` ran already.
        path: the loaded library's path, or None.
        reason: why there is no usable library, or None.
        self_test: None until the first use ran the self-test, then whether
            it passed.
        warned: whether the fallback warning was given.
    """

    module: Any = None
    tried: bool = False
    path: str | None = None
    reason: str | None = None
    self_test: bool | None = None
    warned: bool = False


_lock = threading.Lock()
_state = LoaderState()
# The values the CPU kernels accept (ReadCpuIsaCap in
# custom_ops/kernels/nf4_common.h).
CPU_ISAS = ("auto", "scalar", "avx2", "avx512", "avx512_bf16")


def load():
    """Returns the loaded op module, or None (see `status()` for why).

    Raises:
        ValueError: `KERAS_QLORA_CPU_ISA` is set to a value the kernels
            do not know (unless `KERAS_QLORA_PURE_TF=1`: no kernel runs).
    """
    if os.environ.get("KERAS_QLORA_PURE_TF") != "1":
        check_cpu_isa()
    with _lock:
        if _state.tried:
            return _state.module
        _state.tried = True
        if os.environ.get("KERAS_QLORA_PURE_TF") == "1":
            _state.reason = "KERAS_QLORA_PURE_TF=1 is set"
            return None
        try:
            path = build.find_or_build()
            import tensorflow as tf

            _state.module = tf.load_op_library(str(path))
            _state.path = str(path)
        except Exception as err:  # any failure means: use the pure path
            _state.reason = f"{type(err).__name__}: {err}"
        return _state.module


def check_cpu_isa():
    """Raises ValueError unless `KERAS_QLORA_CPU_ISA` is unset, empty or one
    of `CPU_ISAS` (the kernels read it to cap their instruction set)."""
    value = os.environ.get("KERAS_QLORA_CPU_ISA", "")
    if value and value not in CPU_ISAS:
        raise ValueError(
            f"KERAS_QLORA_CPU_ISA must be one of {', '.join(CPU_ISAS)} (or "
            f"unset). Received: KERAS_QLORA_CPU_ISA={value!r}"
        )


def checked(self_test: Callable[[Any], bool]):
    """The loaded module if `self_test(module)` passed on first use, else None.

    The self-test runs once per process; a library that loads but fails it
    is not used (`self_test` calls `mark_failed` to say why).
    """
    lib = load()
    if lib is None:
        return None
    if _state.self_test is None:
        _state.self_test = bool(self_test(lib))
    return lib if _state.self_test else None


def status() -> dict:
    """What `load()` found: module loaded, library path, or the reason."""
    return dict(
        loaded=_state.module is not None,
        tried=_state.tried,
        path=_state.path,
        reason=_state.reason,
    )


def mark_failed(reason: str):
    """Records that the loaded library must not be used, and why."""
    with _lock:
        _state.reason = reason
        _state.path = None
        _state.module = None


def cuda_status() -> str:
    """One line: whether the library has CUDA kernels, and for what."""
    return build.cuda_status(_state.path)


def warn_fallback(stacklevel: int = 3):
    """Warns once per process that the pure TensorFlow path runs.

    Silent when `KERAS_QLORA_PURE_TF=1` chose that path on purpose.
    """
    if _state.warned or os.environ.get("KERAS_QLORA_PURE_TF") == "1":
        return
    _state.warned = True
    warnings.warn(
        "keras_qlora: the fused NF4 op is not available "
        f"({_state.reason}); using the pure TensorFlow path, "
        "which dequantizes each kernel per call (slower, more memory). "
        "Run `python -m keras_qlora.ops --build` to see the build error, or "
        "set KERAS_QLORA_PURE_TF=1 to choose the pure path silently.",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
