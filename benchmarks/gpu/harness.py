"""GPU harness of the CUDA NF4 kernels: correctness first, then timing.

Runs on a GPU machine with PyTorch and nvcc, without TensorFlow or Keras.
It builds the C ABI library (benchmarks/gpu/build.py, the op library's own
nvcc flags), drives it through ctypes with torch buffers, and prints:

1. correctness: many shapes (odd K, partial blocks, K not a block multiple,
   > 256 blocks, misaligned x), both products (x @ W, x @ W^T), float32 /
   bfloat16 / float16, double quant on and off, every kernel (reference,
   gemv, mma, auto); each against a float64 reference (for the tensor-core
   kernel with the operands rounded as the kernel rounds them), outputs and
   workspace poisoned with NaN, run twice (a moving result means a race),
   and against the CPU emulator (expected bit-exact for gemv / reference).
   Ends with `CORRECTNESS VERDICT: PASS` or `FAIL`.
2. timing (median of cold-L2 runs, CUDA events): ours vs torch.matmul in
   bf16 (cuBLAS) and bitsandbytes' matmul_4bit (when importable) at
   M = 1 ... 8192 for (K, N) = (4096, 4096), (4096, 11008), (11008, 4096):
   time, GB/s on the NF4 weight bytes and % of the measured copy bandwidth,
   TFLOP/s, ratios (> 1: ours is faster), plus the transposed product.

Usage (see benchmarks/gpu/README.md for the device command):
    python benchmarks/gpu/harness.py [--quick | --small] [--skip-timing]
Writes gpu_results.csv and gpu_correctness.txt under $OUT when it is set.
"""

import argparse
import os
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import build as gpu_build  # noqa: E402
from cases import StateCache  # noqa: E402
from cases import correctness_cases  # noqa: E402
from formats import QUANT_TYPES  # noqa: E402
from nf4_abi import ALGOS  # noqa: E402
from nf4_abi import CudaNf4  # noqa: E402
from nf4_abi import Emulator  # noqa: E402
from nf4_abi import load_quantizers  # noqa: E402
from nf4_abi import to_device  # noqa: E402

TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Max |error| over max |reference|: fp32 accumulation, then the output
# rounding of the dtype (tensor cores: checked against rounded operands).
TOLERANCE = {"float32": 2e-6, "bfloat16": 8e-3, "float16": 1e-3}
MMA_F32_TOLERANCE = 1e-4  # tensor-core fp32 accumulation order
TIMING_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
TIMING_ROWS = [1, 8, 32, 128, 512, 2048, 8192]
EMULATE_MAX_MACS = 4e6
SMALL_MACS = 2e6
SIMULATE_MACS = 3e5  # the simulator runs each CUDA thread as an OS thread
# "cuda", or "cpu" with --simulate: the kernels' own source compiled for the
# host (custom_ops/testing/cuda_sim/), driven through the same C ABI.
DEVICE = "cuda"


# ---------------------------------------------------------------- checks


def _tf32(t):
    """cvt.rna.tf32.f32 (ties away from zero)."""
    bits = t.float().contiguous().view(torch.int32).long()
    bits = ((bits + 0x1000) & 0xFFFFE000).to(torch.int64)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return bits.view(torch.float32).double()


def reference(x, w64, transpose, dtype, mma):
    """float64 x @ W (or x @ W^T), operands rounded like the kernel's."""
    w = w64.t() if transpose else w64
    xd = x.double()
    if mma and dtype == "float32":
        return _tf32(xd) @ _tf32(w)
    if mma:
        return xd @ w.float().to(TORCH_DTYPES[dtype]).double()
    return xd @ w


def run_case(lib, emu, states, sm_count, case):
    """Returns a list of problems (empty: the case passed) and notes."""
    m, k, n, block, dq, transpose, dtype, algo, tf32, misaligned, qt = case
    state, dstate, w64 = states.get(k, n, block, dq, qt)
    red = n if transpose else k
    tdtype = TORCH_DTYPES[dtype]
    base = torch.randn(m * red + 8, device=DEVICE).to(tdtype)
    x = base[1 : 1 + m * red] if misaligned else base[: m * red]
    x = x.view(m, red)
    plan = lib.plan(m, k, n, tdtype, transpose, algo, tf32, block, sm_count, qt)
    problems, notes = [], {}
    try:
        y1 = lib.matmul(x, dstate, transpose, algo, tf32, poison=True)
        if DEVICE == "cpu":  # the simulator: the blocks in reverse order
            os.environ["KQ_SIM_REVERSE"] = "1"
        try:
            y2 = lib.matmul(x, dstate, transpose, algo, tf32, poison=True)
        finally:
            os.environ.pop("KQ_SIM_REVERSE", None)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    except RuntimeError as err:  # the ABI's message, or a CUDA fault
        return [f"error: {err}"], notes
    if m == 0:
        return problems, notes
    if torch.isnan(y1).any():
        problems.append("NaN in output (unwritten element?)")
    bits = torch.int32 if dtype == "float32" else torch.int16
    if not torch.equal(y1.view(bits), y2.view(bits)):
        problems.append("two runs differ bitwise (race?)")
    ran = plan.algo
    if misaligned and ran == ALGOS["gemv"] and not transpose:
        ran = ALGOS["reference"]  # the forward GEMV needs a 16-byte x
    mma = ran == ALGOS["mma"]
    ref = reference(x, w64, transpose, dtype, mma)
    err = ((y1.double() - ref).abs().max() / ref.abs().max()).item()
    tol = MMA_F32_TOLERANCE if mma and dtype == "float32" else TOLERANCE[dtype]
    notes["err"] = err
    notes["plan"] = plan.describe()
    if not err < tol:
        problems.append(f"error {err:.3g} >= {tol:g}")
    if emu is not None and m * k * n <= EMULATE_MAX_MACS:
        notes["emulator"] = compare_emulator(
            emu, x, state, transpose, ran, tf32, sm_count, y1
        )
    return problems, notes


def compare_emulator(emu, x, state, transpose, ran, tf32, sm_count, y):
    """Emulates the kernel that ran on the GPU; compares the outputs."""
    import ml_dtypes

    xn = x.float().cpu().numpy()
    if x.dtype == torch.bfloat16:
        xn = xn.astype(ml_dtypes.bfloat16)
    elif x.dtype == torch.float16:
        xn = xn.astype(np.float16)
    algo = {1: "reference", 2: "gemv", 3: "mma"}[ran]
    got, _ = emu.matmul(xn, state, transpose, algo, tf32, sm_count)
    gpu = y.float().cpu().numpy()
    emulated = got.astype(np.float32)
    if ran != ALGOS["mma"]:
        return "bit-exact" if np.array_equal(gpu, emulated) else "DIFFERS"
    scale = max(float(np.abs(emulated).max()), 1e-30)
    return f"max diff {np.abs(gpu - emulated).max() / scale:.2g}"


def correctness(lib, emu, quantizers, sm_count, cases, log):
    states = StateCache(quantizers, DEVICE)
    failures, worst = [], {}
    exact = dict.fromkeys(QUANT_TYPES, 0)
    compared = dict.fromkeys(QUANT_TYPES, 0)
    start = time.perf_counter()
    for case in cases:
        problems, notes = run_case(lib, emu, states, sm_count, case)
        line = f"{case} {notes} {'; '.join(problems) or 'ok'}"
        log.append(line)
        if problems:
            failures.append(line)
        if any("error:" in p and "CUDA" in p for p in problems):
            # A fault poisons the CUDA context: later cases would all fail.
            failures.append("stopped: CUDA error (the context is unusable)")
            break
        if notes.get("emulator") in ("bit-exact", "DIFFERS"):
            compared[case[10]] += 1
            exact[case[10]] += notes["emulator"] == "bit-exact"
        for key in (
            (case[6], notes.get("plan", "?").split("/")[0]),
            (case[10], "format"),
        ):
            worst[key] = max(worst.get(key, 0.0), notes.get("err", 0.0))
    print(
        f"\n== correctness: {len(cases)} cases in "
        f"{time.perf_counter() - start:.1f} s"
    )
    for (dtype, algo), err in sorted(worst.items()):
        if algo != "format":
            print(f"   worst error {dtype:9s} {algo:9s} {err:.3g}")
    counts = {t: sum(c[10] == t for c in cases) for t in QUANT_TYPES}
    for t in QUANT_TYPES:
        err = worst.get((t, "format"), 0.0)
        print(f"   format {t:5s} {counts[t]} cases, worst error {err:.3g}")
    if emu is not None:
        by_type = ", ".join(
            f"{t} {exact[t]}/{compared[t]}" for t in QUANT_TYPES
        )
        print(
            "   emulator bit-exact (gemv/reference): "
            f"{sum(exact.values())}/{sum(compared.values())} ({by_type})"
        )
    for line in failures[:25]:
        print("   FAIL", line)
    verdict = "PASS" if not failures else f"FAIL ({len(failures)} cases)"
    print(f"CORRECTNESS VERDICT: {verdict}")
    return not failures


# ---------------------------------------------------------------- timing


class Timer:
    """Median time of fn() on a cold L2 (a 512 MB buffer is zeroed before
    each run, which also keeps the host ahead of the GPU)."""

    def __init__(self):
        self.flush = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn, reps=25, warmup=3):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        events = [
            (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            for _ in range(reps)
        ]
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return float(np.median([s.elapsed_time(e) for s, e in events]))


def ceilings(timer):
    """Measured copy bandwidth (GB/s, read + write) and bf16 TFLOP/s."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), reps=10)
    copy_gbs = 2 * src.numel() / ms / 1e6
    src = dst = None  # free 2 GB before the matmul
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = timer(lambda: x @ y, reps=10)
    return copy_gbs, 2 * 8192**3 / ms / 1e9


def bnb_matmul():
    """bitsandbytes (quantize, matmul) or None with the reason."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
    except Exception as err:  # ImportError or a broken native library
        return None, f"bitsandbytes not importable: {err!r}"
    return (bnb, bf), f"bitsandbytes {bnb.__version__}"


def time_shape(lib, quantizers, timer, bnb, k, n, transposed):
    rng = np.random.default_rng(k * 7 + n)
    kernel = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    state = quantizers.quantize_nf4(kernel, block_size=64, scale_search=False)
    dstate = to_device(state)
    wt = (
        torch.from_numpy(np.ascontiguousarray(kernel.T))
        .cuda()
        .to(torch.bfloat16)
    )  # [N, K], a torch Linear weight
    weight_bytes = (
        state.packed.nbytes + state.absmax.nbytes + state.absmax_scale.nbytes
    )
    qbnb = None
    if bnb is not None and not transposed:
        qweight, qstate = bnb[1].quantize_4bit(
            wt, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        qbnb = (qweight, qstate)
    rows = []
    for m in TIMING_ROWS:
        red, out = (n, k) if transposed else (k, n)
        x = torch.randn(m, red, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(m, out, device="cuda", dtype=torch.bfloat16)
        plan = lib.plan(
            m,
            k,
            n,
            torch.bfloat16,
            transposed,
            sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
        )
        ws = torch.empty(
            max(plan.workspace_bytes, 1), dtype=torch.uint8, device="cuda"
        )
        ours = timer(
            lambda x=x, y=y, ws=ws: lib.matmul(
                x, dstate, transposed, out=y, workspace=ws
            )
        )
        if transposed:
            cublas = timer(lambda x=x: torch.matmul(x, wt))
        else:
            cublas = timer(lambda x=x: torch.nn.functional.linear(x, wt))
        theirs = None
        if qbnb is not None:
            with torch.inference_mode():
                theirs = timer(
                    lambda x=x: bnb[0].matmul_4bit(
                        x, qbnb[0].t(), quant_state=qbnb[1]
                    )
                )
        rows.append(
            dict(
                k=k,
                n=n,
                m=m,
                transposed=transposed,
                plan=plan.describe(),
                ours_ms=ours,
                cublas_ms=cublas,
                bnb_ms=theirs,
                weight_gbs=weight_bytes / ours / 1e6,
                tflops=2 * m * k * n / ours / 1e9,
            )
        )
    return rows


def print_table(rows, copy_gbs, title):
    print(f"\n== {title}")
    print(
        f"{'K':>6} {'N':>6} {'M':>5} {'plan':>14} {'ours us':>9} "
        f"{'GB/s(w)':>8} {'%copy':>6} {'TFLOP/s':>8} {'cuBLAS us':>9} "
        f"{'x cuBLAS':>8} {'bnb us':>8} {'x bnb':>6}"
    )
    for r in rows:
        bnb_us = f"{1e3 * r['bnb_ms']:8.1f}" if r["bnb_ms"] else f"{'-':>8}"
        bnb_x = (
            f"{r['bnb_ms'] / r['ours_ms']:6.2f}" if r["bnb_ms"] else f"{'-':>6}"
        )
        print(
            f"{r['k']:6d} {r['n']:6d} {r['m']:5d} {r['plan']:>14} "
            f"{1e3 * r['ours_ms']:9.1f} {r['weight_gbs']:8.0f} "
            f"{100 * r['weight_gbs'] / copy_gbs:6.1f} {r['tflops']:8.1f} "
            f"{1e3 * r['cublas_ms']:9.1f} "
            f"{r['cublas_ms'] / r['ours_ms']:8.2f} {bnb_us} {bnb_x}"
        )


def print_targets(rows, copy_gbs):
    """The issue's targets, as measured here (never asserted)."""
    print("\n== targets (H100): met / missed")
    for r in (r for r in rows if not r["transposed"]):
        checks = []
        if r["m"] <= 16:
            checks.append(("HBM >= 70%", r["weight_gbs"] / copy_gbs >= 0.7))
        if r["m"] == 1:
            checks.append(
                (">= 2.7x cuBLAS", r["cublas_ms"] / r["ours_ms"] >= 2.7)
            )
        if r["m"] >= 512:
            checks.append(
                (">= 85% cuBLAS", r["cublas_ms"] / r["ours_ms"] >= 0.85)
            )
        if r["bnb_ms"]:
            checks.append((">= bnb", r["bnb_ms"] >= r["ours_ms"]))
        text = ", ".join(
            f"{name}: {'met' if ok else 'MISSED'}" for name, ok in checks
        )
        print(f"   K={r['k']} N={r['n']} M={r['m']}: {text}")


def timing(lib, quantizers, out_dir):
    timer = Timer()
    copy_gbs, cublas_tflops = ceilings(timer)
    bnb, bnb_note = bnb_matmul()
    print(
        f"\n== ceilings: copy {copy_gbs:.0f} GB/s (read + write), "
        f"bf16 cuBLAS 8192^3 {cublas_tflops:.0f} TFLOP/s; {bnb_note}"
    )
    rows = []
    for transposed in (False, True):
        for k, n in TIMING_SHAPES:
            rows += time_shape(lib, quantizers, timer, bnb, k, n, transposed)
    print_table(
        [r for r in rows if not r["transposed"]],
        copy_gbs,
        "forward y = x @ W, bf16 x, NF4 block 64 + double quant",
    )
    print_table(
        [r for r in rows if r["transposed"]],
        copy_gbs,
        "transposed dx = dy @ W^T (cuBLAS: dy @ W^T in bf16)",
    )
    print_targets(rows, copy_gbs)
    if out_dir is not None:
        keys = list(rows[0])
        lines = [",".join(keys)] + [
            ",".join(str(r[key]) for key in keys) for r in rows
        ]
        (out_dir / "gpu_results.csv").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a quarter of the correctness cases",
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="only small correctness cases (for compute-sanitizer runs)",
    )
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="no GPU needed: the correctness part on the kernels' CPU "
        "simulator (custom_ops/testing/cuda_sim/), small cases only",
    )
    parser.add_argument("--lib", help="a prebuilt libkq_nf4_cuda.so")
    parser.add_argument("--emulator", help="a prebuilt emulator library")
    parser.add_argument("--build-dir", default="/tmp/kq_nf4_gpu")
    args = parser.parse_args(argv)
    if args.simulate:
        return simulate(args)
    if not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    print(
        f"device: {props.name}, {props.multi_processor_count} SMs, "
        f"torch {torch.__version__}"
    )
    build_dir = pathlib.Path(args.build_dir)
    lib_path = args.lib
    emu_path = args.emulator
    if lib_path is None:
        build_dir.mkdir(parents=True, exist_ok=True)
        cc = props.major * 10 + props.minor
        start = time.perf_counter()
        lib_path = gpu_build.build_abi(build_dir, [cc])
        print(
            f"built {lib_path} for sm_{cc} in "
            f"{time.perf_counter() - start:.1f} s"
        )
        emu_path = emu_path or gpu_build.build_emulator(build_dir)
    lib = CudaNf4(lib_path)
    emu = Emulator(emu_path) if emu_path else None
    quantizers = load_quantizers()
    out_dir = pathlib.Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log = []
    cases = correctness_cases(args.quick)
    if args.small:
        cases = [c for c in cases if c[0] * c[1] * c[2] <= SMALL_MACS][:40]
    ok = correctness(
        lib, emu, quantizers, props.multi_processor_count, cases, log
    )
    if out_dir is not None:
        (out_dir / "gpu_correctness.txt").write_text("\n".join(log) + "\n")
    if ok and not args.skip_timing:
        timing(lib, quantizers, out_dir)
    elif not ok:
        print("timing skipped: the kernels are not correct")
    return 0 if ok else 1


def simulate(args) -> int:
    """The correctness part on the CPU simulator of the kernels: the same
    cases (those small enough), the same checks; the second run of each
    case executes the blocks in reverse order."""
    global DEVICE
    DEVICE = "cpu"
    sm_count = int(os.environ.setdefault("KQ_SIM_SM_COUNT", "4"))
    build_dir = pathlib.Path(args.build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    lib_path = args.lib or gpu_build.build_simulator(build_dir)
    emu_path = args.emulator or gpu_build.build_emulator(build_dir)
    cases = [
        c
        for c in correctness_cases(args.quick)
        if c[0] * c[1] * c[2] <= SIMULATE_MACS
    ]
    print(f"simulator: {lib_path}, {sm_count} SMs, {len(cases)} cases")
    log = []
    ok = correctness(
        CudaNf4(lib_path),
        Emulator(emu_path) if emu_path else None,
        load_quantizers(),
        sm_count,
        cases,
        log,
    )
    out = os.environ.get("OUT")
    if out:
        path = pathlib.Path(out) / "sim_correctness.txt"
        path.write_text("\n".join(log) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
