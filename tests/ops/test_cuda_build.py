"""The CUDA half of the fused NF4 op, checked on a machine without a GPU.

- Build: with nvcc, the op library (keras_qlora.ops.build, shared cache)
  holds the CUDA kernels, hides the static CUDA runtime, registers the GPU
  kernel and still runs on CPU; the standalone C ABI library (linked from
  the op library's CUDA archive, so nothing compiles twice) exports exactly
  the C ABI, plans kernels and rejects bad arguments before touching a GPU.
  Without nvcc these tests skip, unless KERAS_QLORA_REQUIRE_NVCC=1 (then
  they fail).
- Kernels: the CPU emulator (custom_ops/testing/cuda_emulator/, g++) runs the
  GEMV, MMA and reference kernels' algorithms through the kernels' own plan,
  index, decode and fragment helpers, and is compared with a float64
  reference, for every base format (nf4, fp4, int8; the states are built
  by benchmarks/gpu/formats.py). What it cannot show (races, the hardware
  itself) is listed in its header; the GPU harness (benchmarks/gpu/) covers
  that on a GPU.
"""

import ctypes
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from keras_qlora import quantizers
from keras_qlora.ops import build
from keras_qlora.ops import loader
from keras_qlora.quantizers import dequantize_nf4
from keras_qlora.quantizers import quantize_nf4

REPO = pathlib.Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location(
    "kq_gpu_formats", REPO / "benchmarks" / "gpu" / "formats.py"
)
formats = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(formats)
CUDA_DIR = build.source_dir() / "cuda"
EMULATOR_DIR = build.source_dir() / "testing" / "cuda_emulator"
ABI_FUNCTIONS = {
    "kq_nf4_cuda_abi_version",
    "kq_nf4_cuda_plan",
    "kq_nf4_cuda_workspace_size",
    "kq_nf4_matmul_cuda",
}
REFERENCE, GEMV, MMA = 1, 2, 3
DTYPES = {
    "float32": (0, np.float32),
    "bfloat16": (1, ml_dtypes.bfloat16),
    "float16": (2, np.float16),
}
H100_SMS = 132
QUANT = formats.QUANT_CODES  # nf4 0, fp4 1, int8 2


class Plan(ctypes.Structure):
    _fields_ = [
        ("algo", ctypes.c_int),
        ("variant", ctypes.c_int),
        ("splits", ctypes.c_int),
        ("workspace_bytes", ctypes.c_int64),
    ]


def _require_cuda() -> dict:
    config = build.cuda_config()
    if config["enabled"]:
        return config
    reason = f"the CUDA kernels are not built here: {config['reason']}"
    if os.environ.get("KERAS_QLORA_REQUIRE_NVCC") == "1":
        pytest.fail(f"KERAS_QLORA_REQUIRE_NVCC=1 but {reason}")
    pytest.skip(
        f"{reason}. Install the CUDA toolkit (nvcc) or set "
        "KERAS_QLORA_REQUIRE_NVCC=1 to turn this skip into a failure."
    )


def _defined_symbols(path) -> set:
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def op_library_path():
    _require_cuda()
    if loader.load() is None:
        pytest.fail(f"the op library did not load: {loader.status()}")
    return pathlib.Path(loader.status()["path"])


@pytest.fixture(scope="module")
def abi(op_library_path, tmp_path_factory):
    """The standalone C ABI library, linked from the op library's archive."""
    archive = op_library_path.parent / build.CUDA_ARCHIVE_NAME
    out = tmp_path_factory.mktemp("abi") / "libkq_nf4_cuda.so"
    build.build_cuda_abi_library(
        out, archive=archive if archive.exists() else None
    )
    lib = ctypes.CDLL(str(out))
    lib.kq_nf4_cuda_plan.argtypes = (
        [ctypes.c_int64] * 3
        + [ctypes.c_int] * 7
        + [ctypes.POINTER(Plan), ctypes.c_char_p, ctypes.c_int]
    )
    p = ctypes.c_void_p
    lib.kq_nf4_matmul_cuda.argtypes = [
        p,
        ctypes.c_int,
        p,
        p,
        ctypes.c_int,
        p,
        p,
        p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        p,
        ctypes.c_size_t,
        p,
        ctypes.c_char_p,
        ctypes.c_int,
    ]
    return lib, out


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The CPU emulator of the kernels (g++ only; no nvcc needed)."""
    out = tmp_path_factory.mktemp("emulator") / "libkq_nf4_emulator.so"
    sources = sorted(EMULATOR_DIR.glob("*.cc"))
    cmd = [
        os.environ.get("CXX", "g++"),
        "-std=c++17",
        "-O2",
        "-shared",
        "-fPIC",
        "-ffp-contract=off",
        "-fvisibility=hidden",
        *map(str, sources),
        "-o",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lib = ctypes.CDLL(str(out))
    p = ctypes.c_void_p
    lib.kq_nf4_emulate.argtypes = [
        p,
        ctypes.c_int,
        p,
        p,
        ctypes.c_int,
        p,
        p,
        p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(Plan),
        ctypes.c_char_p,
        ctypes.c_int,
    ]
    return lib


# ---------------------------------------------------------------- build


def test_op_library_holds_cuda_kernels_and_hides_the_runtime(op_library_path):
    assert loader.cuda_status().startswith("built (nvcc ")
    exported = _defined_symbols(op_library_path)
    leaked = sorted(s for s in exported if re.match(r"_*cu[A-Z]|_*cuda", s))
    assert leaked == [], f"CUDA runtime symbols exported: {leaked[:10]}"
    archive = op_library_path.parent / build.CUDA_ARCHIVE_NAME
    assert archive.exists() and archive.stat().st_size > 0


def test_gpu_kernel_is_registered_and_cpu_still_runs(op_library_path):
    import tensorflow as tf
    from tensorflow.python.framework import kernels

    from keras_qlora import ops

    registered = kernels.get_registered_kernels_for_op("KerasQLoRA>NF4Matmul")
    devices = sorted({k.device_type for k in registered.kernel})
    assert devices == ["CPU", "GPU"]
    assert ops.active_path()[0] == "fused"
    rng = np.random.default_rng(1)
    state = quantize_nf4(rng.standard_normal((96, 40)).astype("float32"))
    x = rng.standard_normal((3, 96)).astype("float32")
    with tf.device("/CPU:0"):
        y = ops.nf4_matmul(x, state)
    np.testing.assert_allclose(
        np.asarray(y), x @ dequantize_nf4(state), rtol=1e-5, atol=1e-5
    )


def test_info_command_reports_the_cuda_kernels(op_library_path):
    result = subprocess.run(
        [sys.executable, "-m", "keras_qlora.ops", "--info"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cuda kernels: built (nvcc " in result.stdout


def test_abi_library_exports_exactly_the_c_abi(abi):
    lib, path = abi
    exported = {s for s in _defined_symbols(path) if not s.startswith("_")}
    assert exported == ABI_FUNCTIONS
    header = (CUDA_DIR / "nf4_cuda.h").read_text()
    version = re.search(r"#define KQ_NF4_CUDA_ABI_VERSION (\d+)", header)
    assert lib.kq_nf4_cuda_abi_version() == int(version.group(1))


def _plan(
    lib,
    m,
    k,
    n,
    dtype="bfloat16",
    transpose=0,
    algo=0,
    tf32=1,
    block=64,
    sms=H100_SMS,
    quant="nf4",
):
    plan, err = Plan(), ctypes.create_string_buffer(512)
    rc = lib.kq_nf4_cuda_plan(
        m,
        k,
        n,
        DTYPES[dtype][0],
        block,
        QUANT.get(quant, quant),
        transpose,
        algo,
        tf32,
        sms,
        ctypes.byref(plan),
        err,
        512,
    )
    return rc, plan, err.value.decode()


@pytest.mark.parametrize(
    "args, algo, variant",
    [
        ((1, 4096, 4096), GEMV, 1),
        ((8, 4096, 11008), GEMV, 8),
        ((9, 4096, 4096), MMA, 16),
        ((64, 4096, 4096), MMA, 64),
        ((512, 11008, 4096), MMA, 128),
        ((4, 4096, 4096, "bfloat16", 1), GEMV, 4),  # transposed
        ((5, 4096, 4096, "bfloat16", 1), MMA, 16),
        ((512, 4096, 4096, "float32", 0, 0, 0), GEMV, 8),  # exact fp32
        ((512, 4096, 4096, "float32"), MMA, 128),  # TF32 allowed
        ((512, 4096, 4096, "float32", 0, MMA, 0), GEMV, 8),
        ((1, 33, 64), REFERENCE, 0),  # K % 16 != 0
        ((64, 4112, 64, "float16", 0, GEMV), REFERENCE, 0),  # K % 32 != 0
        ((64, 4112, 64, "float16"), MMA, 64),
    ],
)
def test_plan_picks_the_kernel_by_m_and_shape(abi, args, algo, variant):
    rc, plan, err = _plan(abi[0], *args)
    assert rc == 0, err
    assert (plan.algo, plan.variant) == (algo, variant)
    m, k, n = args[:3]
    out = k if len(args) > 4 and args[4] else n
    expected = plan.splits * m * out * 4 if plan.splits > 1 else 0
    assert plan.workspace_bytes == expected


def test_plan_splits_the_reduction_when_outputs_are_few(abi):
    rc, plan, _ = _plan(abi[0], 1, 4096, 256)  # 16 GEMV blocks only
    assert rc == 0 and plan.algo == GEMV and plan.splits > 1
    rc, plan, _ = _plan(abi[0], 1, 4096, 256, sms=1)
    assert rc == 0 and plan.splits == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(block=48),
            r"block_size must be one of \(32, 64, 128, 256\)\. "
            r"Received: block_size=48",
        ),
        (dict(algo=9), r"algo must be 0 \(auto\).*Received: algo=9"),
        (dict(sms=0), r"sm_count must be >= 1\. Received: sm_count=0"),
    ],
)
def test_plan_rejects_bad_arguments(abi, kwargs, message):
    rc, _, err = _plan(abi[0], 4, 64, 64, **kwargs)
    assert rc == 1
    assert re.search(message, err), err


def test_plan_rejects_bad_dtype_and_sizes(abi):
    lib = abi[0]
    plan, err = Plan(), ctypes.create_string_buffer(512)
    rc = lib.kq_nf4_cuda_plan(
        4, 64, 64, 7, 64, 0, 0, 0, 1, 132, ctypes.byref(plan), err, 512
    )
    assert rc == 1 and b"Received: x_dtype=7" in err.value
    rc = lib.kq_nf4_cuda_plan(
        4, 0, 64, 0, 64, 0, 0, 0, 1, 132, ctypes.byref(plan), err, 512
    )
    assert rc == 1 and b"Received: m=4, k=0, n=64" in err.value


def _matmul_args(
    x=1, packed=1, absmax=1, u8=0, scale=None, offset=None, y=1, m=2, quant=0
):
    # Non-NULL dummy pointers: validation must fail before any use.
    return [
        x,
        0,
        packed,
        absmax,
        u8,
        scale,
        offset,
        y,
        m,
        64,
        64,
        64,
        quant,
        0,
        0,
        1,
        None,
        0,
        None,
    ]


def test_matmul_validates_before_touching_a_device(abi):
    lib = abi[0]
    err = ctypes.create_string_buffer(512)
    rc = lib.kq_nf4_matmul_cuda(*_matmul_args(x=None), err, 512)
    assert rc == 1 and b"x, packed, absmax and y must not be NULL" in err.value
    rc = lib.kq_nf4_matmul_cuda(*_matmul_args(u8=1, scale=None), err, 512)
    assert rc == 1 and b"absmax_scale and absmax_offset must not be NULL" in (
        err.value
    )
    assert lib.kq_nf4_matmul_cuda(*_matmul_args(m=0), err, 512) == 0
    # int8 (block_size == k == 64 here) has float32 row scales only.
    rc = lib.kq_nf4_matmul_cuda(
        *_matmul_args(u8=1, scale=1, offset=1, quant=2), err, 512
    )
    assert rc == 1 and b"quant_type=2 (int8) takes float32 absmax" in (
        err.value
    )


@pytest.mark.skipif(
    os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl"),
    reason="a GPU is present: this checks the error path without one",
)
def test_matmul_without_a_gpu_returns_a_cuda_error(abi):
    lib = abi[0]
    err = ctypes.create_string_buffer(512)
    rc = lib.kq_nf4_matmul_cuda(*_matmul_args(), err, 512)
    assert rc == 3, err.value
    assert err.value.startswith(b"kq_nf4: cannot use the stream's device")


# ---------------------------------------------------------------- kernels


def _tf32(a):
    """cvt.rna.tf32.f32 (ties away from zero) in numpy, as float64."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x1000) & 0xFFFFE000).astype(np.uint32)
    return bits.view(np.float32).astype(np.float64)


def _emulate(
    lib,
    m,
    k,
    n,
    block,
    dq,
    transpose,
    dtype,
    algo,
    tf32=1,
    misalign_x=False,
    seed=0,
    quant="nf4",
):
    """Runs the emulator; returns (plan, y as float64, float64 reference).
    int8 states have block_size == k (`block` is ignored) and no double
    quant (`dq` is ignored)."""
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal((k, n)).astype(np.float32)
    state = formats.make_state(quantizers, kernel, quant, block, dq)
    block, dq = state.block_size, state.absmax_scale is not None
    code, np_dtype = DTYPES[dtype]
    red, out = (n, k) if transpose else (k, n)
    storage = rng.standard_normal(m * red + 8).astype(np_dtype)
    x = storage[1 : 1 + m * red] if misalign_x else storage[: m * red]
    y = np.full((m, out), np.nan, dtype=np_dtype)  # every element written?
    absmax = np.ascontiguousarray(state.absmax)
    scale = np.ascontiguousarray(state.absmax_scale) if dq else None
    offset = np.array([state.absmax_offset], np.float32) if dq else None
    plan, err = Plan(), ctypes.create_string_buffer(512)
    rc = lib.kq_nf4_emulate(
        x.ctypes.data,
        code,
        state.packed.ctypes.data,
        absmax.ctypes.data,
        int(dq),
        None if scale is None else scale.ctypes.data,
        None if offset is None else offset.ctypes.data,
        y.ctypes.data,
        m,
        k,
        n,
        block,
        QUANT[quant],
        int(transpose),
        algo,
        tf32,
        H100_SMS,
        ctypes.byref(plan),
        err,
        512,
    )
    assert rc == 0, err.value.decode()
    w = formats.dequantize(quantizers, state).astype(np.float64)
    w = w.T if transpose else w
    xd = x.reshape(m, red).astype(np.float64)
    if plan.algo == MMA and dtype == "float32":
        ref = _tf32(xd) @ _tf32(w)  # the tensor cores' TF32 operands
    elif plan.algo == MMA:
        ref = xd @ w.astype(np.float32).astype(np_dtype).astype(np.float64)
    else:
        ref = xd @ w
    return plan, y.astype(np.float64), ref


# Max error over max |reference|: fp32 accumulation, then the output dtype.
TOLERANCE = {"float32": 2e-6, "bfloat16": 8e-3, "float16": 1e-3}

# (m, k, n, block, double_quant, transpose, dtype, algo, expected algo)
KERNEL_CASES = [
    (1, 64, 64, 64, True, False, "float32", 0, GEMV),
    (3, 96, 40, 64, True, False, "float32", GEMV, GEMV),  # blocks straddle
    (5, 1024, 300, 32, False, False, "bfloat16", 0, GEMV),
    (8, 4096, 48, 64, True, False, "float32", 0, GEMV),  # split-K
    (2, 256, 200, 128, True, False, "float16", 0, GEMV),  # > 256 blocks
    (1, 64, 64, 64, True, True, "float32", 0, GEMV),
    (3, 96, 40, 64, False, True, "float16", 0, GEMV),
    (4, 2048, 700, 256, True, True, "float32", 0, GEMV),  # split rows
    (2, 528, 17, 64, True, True, "bfloat16", 0, GEMV),  # partial columns
    (20, 96, 40, 64, False, True, "float32", GEMV, GEMV),  # x in passes
    (33, 33, 17, 32, True, False, "float32", 0, REFERENCE),  # odd K, K * N
    (7, 33, 17, 32, True, True, "bfloat16", MMA, REFERENCE),
    (3, 100, 30, 128, False, False, "float16", 0, REFERENCE),
    (9, 96, 40, 64, True, False, "bfloat16", 0, MMA),
    (20, 96, 40, 64, True, True, "bfloat16", 0, MMA),
    (16, 2048, 256, 64, True, False, "bfloat16", 0, MMA),  # split-K
    (16, 2048, 256, 64, True, True, "float32", 0, MMA),  # TF32
    (70, 128, 131, 64, False, False, "float16", 0, MMA),  # partial tiles
    (70, 128, 131, 64, True, True, "float32", 0, MMA),  # odd N: scalar x
    (130, 256, 200, 128, True, False, "float32", 0, MMA),
    (130, 256, 200, 256, False, True, "bfloat16", 0, MMA),
    (3, 64, 64, 64, True, False, "float16", MMA, MMA),  # forced, M < 16
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_emulated_kernels_match_a_float64_reference(emulator, case):
    *args, algo, want = case
    plan, got, ref = _emulate(emulator, *args, algo=algo)
    assert plan.algo == want
    assert not np.isnan(got).any(), "an output element was never written"
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < TOLERANCE[args[-1]], (plan.algo, plan.splits, err)


def test_emulated_mma_reads_misaligned_x_elementwise(emulator):
    for dtype in ("bfloat16", "float32"):
        plan, got, ref = _emulate(
            emulator, 40, 128, 96, 64, True, False, dtype, MMA, misalign_x=True
        )
        assert plan.algo == MMA
        assert np.abs(got - ref).max() / np.abs(ref).max() < TOLERANCE[dtype]


def test_emulated_gemv_falls_back_on_misaligned_x(emulator):
    plan, got, ref = _emulate(
        emulator, 2, 128, 96, 64, True, False, "float32", GEMV, misalign_x=True
    )
    assert plan.algo == REFERENCE
    assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-6


def test_emulated_exact_fp32_mode_never_rounds_to_tf32(emulator):
    # Without TF32, float32 stays exact at any M (GEMV in passes of 8 rows).
    plan, got, ref = _emulate(
        emulator, 40, 256, 96, 64, True, False, "float32", 0, tf32=0
    )
    assert (plan.algo, plan.variant) == (GEMV, 8)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-6
