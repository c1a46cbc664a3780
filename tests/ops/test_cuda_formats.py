"""The CUDA kernels with the fp4 and int8 base formats, without a GPU.

fp4 runs nf4's kernels with its own code table (every kernel family); int8
(one byte per element, one float32 scale per W^T row, block_size == K for
any K) runs the tensor-core kernel's int8 instantiation when TF32 / 16-bit
tensor cores are allowed and K % 16 == 0, else the reference kernel; it
has no GEMV kernel (nf4_cuda_plan.h). Checked
here through the C ABI's planner and argument checks, and on the CPU
emulator against a float64 reference; test_cuda_sim.py runs the kernels'
own source on the CPU simulator for every format. Skips without nvcc, as
test_cuda_build.py, whose fixtures and helpers these tests use.
"""

# The fixtures imported below are test arguments here (F811 is pytest's
# way of sharing them between modules without a conftest.py).
# ruff: noqa: F811

import re

import numpy as np
import pytest
from test_cuda_build import DTYPES
from test_cuda_build import GEMV
from test_cuda_build import MMA
from test_cuda_build import REFERENCE
from test_cuda_build import TOLERANCE
from test_cuda_build import _emulate
from test_cuda_build import _plan
from test_cuda_build import abi  # noqa: F401 (a fixture)
from test_cuda_build import emulator  # noqa: F401 (a fixture)
from test_cuda_build import op_library_path  # noqa: F401 (a fixture)

# ---------------------------------------------------------------- plan


def _int8_algo(k, dtype, algo, tf32=1):
    """What the planner runs for int8 (see nf4_cuda_plan.h)."""
    exact_f32 = dtype == "float32" and not tf32
    if algo == REFERENCE or exact_f32 or k % 16:
        return REFERENCE
    return MMA


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("transpose", [0, 1])
@pytest.mark.parametrize("algo", [0, REFERENCE, GEMV, MMA])
@pytest.mark.parametrize("tf32", [1, 0])
def test_int8_plans_mma_or_the_reference_kernel(
    abi, dtype, transpose, algo, tf32
):
    for m in (1, 4, 9, 64, 512):
        for k, n in ((4096, 4096), (70, 24), (300, 11008), (240, 64)):
            rc, plan, err = _plan(
                abi[0], m, k, n, dtype, transpose, algo, tf32, k, quant="int8"
            )
            assert rc == 0, err
            assert plan.algo == _int8_algo(k, dtype, algo, tf32), (m, k, n)
            out = k if transpose else n
            ws = plan.splits * m * out * 4 if plan.splits > 1 else 0
            assert plan.workspace_bytes == ws


def test_fp4_plans_like_nf4(abi):
    for args in ((1, 4096, 4096), (64, 4096, 4096), (4, 4096, 4096, "f", 1)):
        args = tuple("float32" if a == "f" else a for a in args)
        _, nf4, _ = _plan(abi[0], *args)
        rc, fp4, err = _plan(abi[0], *args, quant="fp4")
        assert rc == 0, err
        assert (fp4.algo, fp4.variant, fp4.splits) == (
            nf4.algo,
            nf4.variant,
            nf4.splits,
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(quant=3),
            r"quant_type must be 0 \(nf4\), 1 \(fp4\) or 2 \(int8\)\. "
            r"Received: quant_type=3",
        ),
        (
            dict(quant="int8", block=64),
            r"block_size must equal k=70\. Received: block_size=64",
        ),
        (
            dict(quant="fp4", block=70),
            r"block_size must be one of \(32, 64, 128, 256\)\. "
            r"Received: block_size=70",
        ),
    ],
)
def test_plan_rejects_bad_quant_arguments(abi, kwargs, message):
    rc, _, err = _plan(abi[0], 4, 70, 64, **kwargs)
    assert rc == 1
    assert re.search(message, err), err


# ---------------------------------------------------------------- kernels

# (m, k, n, block, double_quant, transpose, dtype, algo, expected algo)
FP4_CASES = [
    (1, 64, 64, 64, True, False, "float32", 0, GEMV),
    (5, 1024, 300, 32, False, False, "bfloat16", 0, GEMV),
    (8, 4096, 48, 64, True, False, "float32", 0, GEMV),  # split-K
    (3, 96, 40, 64, False, True, "float16", 0, GEMV),
    (4, 2048, 700, 256, True, True, "float32", 0, GEMV),  # split rows
    (33, 33, 17, 32, True, False, "float32", 0, REFERENCE),  # odd K * N
    (7, 33, 17, 32, False, True, "bfloat16", MMA, REFERENCE),
    (9, 96, 40, 64, True, False, "bfloat16", 0, MMA),
    (20, 96, 40, 64, False, True, "float16", 0, MMA),
    (16, 2048, 256, 64, True, True, "float32", 0, MMA),  # TF32, split-K
    (70, 128, 131, 64, True, False, "float16", 0, MMA),  # partial tiles
    (130, 256, 200, 128, False, True, "bfloat16", 0, MMA),
]
# int8: K not a power of two, a multiple of 16 (96, 240, 2000: the MMA
# kernel, with partial tiles and split-K) or not (70, 300, 33: the
# reference kernel); each algo request and both TF32 settings for float32.
INT8_CASES = [
    (m, k, n, dtype, transpose, algo)
    for (m, k, n) in (
        (1, 70, 24),
        (5, 300, 40),
        (33, 33, 17),
        (3, 96, 40),
        (70, 240, 131),
        (16, 2000, 64),
    )
    for dtype in sorted(DTYPES)
    for transpose in (False, True)
    for algo in (0, GEMV if m < 9 else MMA)
]


def _error(got, ref):
    return np.abs(got - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("case", FP4_CASES, ids=str)
def test_emulated_fp4_kernels_match_a_float64_reference(emulator, case):
    *args, algo, want = case
    plan, got, ref = _emulate(emulator, *args, algo=algo, quant="fp4")
    assert plan.algo == want
    assert not np.isnan(got).any(), "an output element was never written"
    assert _error(got, ref) < TOLERANCE[args[-1]], (plan.algo, plan.splits)


def test_emulated_fp4_differs_from_nf4_on_the_same_codes(emulator):
    # The fp4 table is really used: the same bytes read as nf4 give another
    # product (guards against a kernel that ignores quant_type).
    _, fp4, _ = _emulate(
        emulator, 3, 96, 40, 64, True, False, "float32", 0, quant="fp4"
    )
    _, nf4, _ = _emulate(emulator, 3, 96, 40, 64, True, False, "float32", 0)
    assert _error(fp4, nf4) > 0.05


@pytest.mark.parametrize("case", INT8_CASES, ids=str)
def test_emulated_int8_kernel_matches_a_float64_reference(emulator, case):
    m, k, n, dtype, transpose, algo = case
    plan, got, ref = _emulate(
        emulator, m, k, n, k, False, transpose, dtype, algo, quant="int8"
    )
    assert plan.algo == _int8_algo(k, dtype, algo)
    assert not np.isnan(got).any(), "an output element was never written"
    assert _error(got, ref) < TOLERANCE[dtype], (m, k, n, plan.splits)


def test_emulated_int8_exact_fp32_runs_the_reference_kernel(emulator):
    plan, got, ref = _emulate(
        emulator, 40, 96, 40, 96, False, False, "float32", 0, 0, quant="int8"
    )
    assert plan.algo == REFERENCE
    assert _error(got, ref) < TOLERANCE["float32"]


def test_emulated_int8_mma_reads_misaligned_x_elementwise(emulator):
    plan, got, ref = _emulate(
        emulator,
        40,
        240,
        40,
        240,
        False,
        True,
        "bfloat16",
        MMA,
        misalign_x=True,
        quant="int8",
    )
    assert plan.algo == MMA
    assert _error(got, ref) < TOLERANCE["bfloat16"]
