"""ctypes bindings of the CUDA NF4 C ABI (custom_ops/cuda/nf4_cuda.h) and of
its CPU emulator, for torch tensors and numpy arrays. No TensorFlow, no
Keras; `load_quantizers()` imports keras_qlora.quantizers (numpy only)
without running keras_qlora/__init__.py, which imports Keras. Every base
format (nf4 / fp4 / int8, formats.py): the state's `quant_type` goes to the
C ABI's `quant_type` argument.
"""

import ctypes
import pathlib
import sys
import types

from formats import QUANT_CODES
from formats import quant_type_of

REPO = pathlib.Path(__file__).resolve().parents[2]
ALGOS = {"auto": 0, "reference": 1, "gemv": 2, "mma": 3}
ALGO_NAMES = {v: k for k, v in ALGOS.items()}
_P = ctypes.c_void_p
_I = ctypes.c_int
_I64 = ctypes.c_int64


class Plan(ctypes.Structure):
    _fields_ = [
        ("algo", _I),
        ("variant", _I),
        ("splits", _I),
        ("workspace_bytes", _I64),
    ]

    def describe(self) -> str:
        return f"{ALGO_NAMES[self.algo]}/{self.variant}/x{self.splits}"


def load_quantizers():
    """keras_qlora.quantizers with a stub parent package (no Keras)."""
    if "keras_qlora" not in sys.modules:
        package = types.ModuleType("keras_qlora")
        package.__path__ = [str(REPO / "keras_qlora")]
        sys.modules["keras_qlora"] = package
    import keras_qlora.quantizers as quantizers

    return quantizers


def dtype_code(dtype) -> int:
    """0/1/2 for float32/bfloat16/float16 (torch or numpy dtype names)."""
    name = str(dtype).replace("torch.", "")
    return {"float32": 0, "bfloat16": 1, "float16": 2}[name]


class CudaNf4:
    """The C ABI library; tensors are torch CUDA tensors (host tensors for
    the simulator build, benchmarks/gpu/build.py `build_simulator`)."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        lib = self.lib
        lib.kq_nf4_cuda_plan.argtypes = (
            [_I64] * 3 + [_I] * 7 + [ctypes.POINTER(Plan), ctypes.c_char_p, _I]
        )
        lib.kq_nf4_cuda_workspace_size.argtypes = (
            [_I64] * 3
            + [_I] * 6
            + [_P, ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p, _I]
        )
        lib.kq_nf4_matmul_cuda.argtypes = [
            _P,
            _I,
            _P,
            _P,
            _I,
            _P,
            _P,
            _P,
            _I64,
            _I64,
            _I64,
            _I,
            _I,
            _I,
            _I,
            _I,
            _P,
            ctypes.c_size_t,
            _P,
            ctypes.c_char_p,
            _I,
        ]

    def plan(
        self,
        m,
        k,
        n,
        dtype,
        transpose=False,
        algo="auto",
        allow_tf32=True,
        block_size=64,
        sm_count=132,
        quant_type="nf4",
    ) -> Plan:
        plan, err = Plan(), ctypes.create_string_buffer(512)
        rc = self.lib.kq_nf4_cuda_plan(
            m,
            k,
            n,
            dtype_code(dtype),
            block_size,
            QUANT_CODES[quant_type],
            int(transpose),
            ALGOS[algo],
            int(allow_tf32),
            sm_count,
            ctypes.byref(plan),
            err,
            512,
        )
        if rc:
            raise RuntimeError(err.value.decode())
        return plan

    def matmul(
        self,
        x,
        state,
        transpose=False,
        algo="auto",
        allow_tf32=True,
        out=None,
        workspace=None,
        poison=False,
    ):
        """y = x @ W (or x @ W^T) for `state` (see `to_device`)."""
        import torch

        k, n = state["shape"]
        red, out_dim = (n, k) if transpose else (k, n)
        m = x.numel() // red
        # The simulator (host tensors) takes no stream.
        stream = _P(torch.cuda.current_stream().cuda_stream if x.is_cuda else 0)
        err = ctypes.create_string_buffer(512)
        size = ctypes.c_size_t(0)
        args = (
            m,
            k,
            n,
            dtype_code(x.dtype),
            state["block_size"],
            QUANT_CODES[state["quant_type"]],
            int(transpose),
            ALGOS[algo],
            int(allow_tf32),
        )
        rc = self.lib.kq_nf4_cuda_workspace_size(
            *args, stream, ctypes.byref(size), err, 512
        )
        if rc:
            raise RuntimeError(err.value.decode())
        if out is None:
            out = torch.empty((m, out_dim), dtype=x.dtype, device=x.device)
            if poison:
                out.fill_(float("nan"))
        if size.value and (workspace is None or workspace.numel() < size.value):
            workspace = torch.empty(
                size.value, dtype=torch.uint8, device=x.device
            )
            if poison:  # NaN partial sums: an unwritten slot shows
                workspace.view(torch.float32).fill_(float("nan"))
        dq = state["double_quant"]
        rc = self.lib.kq_nf4_matmul_cuda(
            x.data_ptr(),
            dtype_code(x.dtype),
            state["packed"].data_ptr(),
            state["absmax"].data_ptr(),
            int(dq),
            state["absmax_scale"].data_ptr() if dq else None,
            state["absmax_offset"].data_ptr() if dq else None,
            out.data_ptr(),
            m,
            k,
            n,
            state["block_size"],
            QUANT_CODES[state["quant_type"]],
            int(transpose),
            ALGOS[algo],
            int(allow_tf32),
            workspace.data_ptr() if size.value else None,
            size.value,
            stream,
            err,
            512,
        )
        if rc:
            raise RuntimeError(err.value.decode())
        return out


def to_device(state, device="cuda") -> dict:
    """A state's arrays (any base format) as torch tensors on `device`."""
    import numpy as np
    import torch

    def put(array):
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    dq = state.absmax_scale is not None
    offset = None
    if dq:  # a device scalar: the kernels read it, nothing synchronizes
        offset = torch.tensor(
            float(state.absmax_offset), dtype=torch.float32, device=device
        )
    return dict(
        shape=tuple(state.shape),
        block_size=int(state.block_size),
        quant_type=quant_type_of(state),
        double_quant=dq,
        packed=put(state.packed),
        absmax=put(state.absmax),
        absmax_scale=put(state.absmax_scale) if dq else None,
        absmax_offset=offset,
    )


class Emulator:
    """The CPU emulator (custom_ops/testing/cuda_emulator/); numpy arrays."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.kq_nf4_emulate.argtypes = [
            _P,
            _I,
            _P,
            _P,
            _I,
            _P,
            _P,
            _P,
            _I64,
            _I64,
            _I64,
            _I,
            _I,
            _I,
            _I,
            _I,
            _I,
            ctypes.POINTER(Plan),
            ctypes.c_char_p,
            _I,
        ]

    def matmul(
        self,
        x,
        state,
        transpose=False,
        algo="auto",
        allow_tf32=True,
        sm_count=132,
    ):
        """Returns (y, plan); x is a 2-D numpy array (bf16 as ml_dtypes or
        as a uint16 view)."""
        import numpy as np

        k, n = state.shape
        m, red = x.shape
        out = np.full((m, n if not transpose else k), np.nan, dtype=x.dtype)
        dq = state.absmax_scale is not None
        absmax = np.ascontiguousarray(state.absmax)
        scale = np.ascontiguousarray(state.absmax_scale) if dq else None
        offset = np.array([state.absmax_offset], np.float32) if dq else None
        plan, err = Plan(), ctypes.create_string_buffer(512)
        rc = self.lib.kq_nf4_emulate(
            x.ctypes.data,
            dtype_code(x.dtype),
            state.packed.ctypes.data,
            absmax.ctypes.data,
            int(dq),
            scale.ctypes.data if dq else None,
            offset.ctypes.data if dq else None,
            out.ctypes.data,
            m,
            k,
            n,
            state.block_size,
            QUANT_CODES[quant_type_of(state)],
            int(transpose),
            ALGOS[algo],
            int(allow_tf32),
            sm_count,
            ctypes.byref(plan),
            err,
            512,
        )
        if rc:
            raise RuntimeError(err.value.decode())
        return out, plan
