"""Compile-only checks of the generated CUDA code (no GPU needed).

benchmarks/gpu/inspect_ptx.py compiles custom_ops/cuda/*.cu once for sm_80
and sm_90 with the op library's own nvcc flags, keeps the PTX and reads
ptxas' resource usage. These tests assert properties of that code that a
kernel change could break without any numerical test noticing: which
instantiations exist, how wide the weight and activation loads are (traced
to the `Nf4Args` pointer they read), register / spill / shared-memory
budgets that the launch configuration relies on, and which tensor-core
instruction each dtype uses.

Without nvcc these tests skip, unless KERAS_QLORA_REQUIRE_NVCC=1 (then they
fail), as in test_cuda_build.py. The parser tests at the end need no nvcc.
"""

import importlib.util
import json
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location(
    "kq_inspect_ptx", REPO / "benchmarks" / "gpu" / "inspect_ptx.py"
)
inspect_ptx = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(inspect_ptx)

ARCHS = (80, 90)
DTYPES = ("float", "__nv_bfloat16", "__half")
GEMV_FORWARD_ROWS = (1, 2, 4, 8)
GEMV_TRANSPOSE_ROWS = (1, 2, 4)
MMA_TILE_ROWS = (16, 64, 128)
MMA_INT8 = ("false", "true")  # MmaKernel's I8: 4-bit or int8 weights

STATIC_SMEM_LIMIT = 48 * 1024  # per block, without dynamic opt-in
SM_SHARED = {80: 164 * 1024, 90: 228 * 1024}  # usable per SM
RESERVED_SMEM_PER_BLOCK = 1024  # the driver's share per block (sm_80+)
REGISTERS_PER_SM = 64 * 1024
MMA_THREADS, MMA_MIN_BLOCKS = 256, 2  # __launch_bounds__(256, 2)

# MmaKernel with BM = 128 holds a 64 x 32 float accumulator tile per warp
# (4 x 4 m16n8 fragments, 256 bytes per thread) plus the next stage's
# global loads (x: 2 x 16 B, W: 8 B + a 4 B scale) under the 128-register
# cap of two blocks per SM. ptxas spills a little of it (nvcc 13.0: 16 B
# stored / 64 B reloaded on sm_80 for bf16 and f16, 4 / 4 for float32,
# 8 / 8 on sm_90). The budget is twice the worst measured value, room for
# another compiler's allocation; spilling one m16 row of accumulators
# (64 B) or the staged x vectors (32 B more) goes over it, a single extra
# 16-byte value does not.
MMA_128_SPILL_BUDGET = dict(spill_stores=32, spill_loads=128, stack_frame=32)

MMA_INSTRUCTION = {
    "float": "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
    "__nv_bfloat16": "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
    "__half": "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
}
# How each kernel reads the packed weights: 16-byte chunks of 32 codes
# (forward GEMV), 8-byte units of 16 codes (transposed GEMV, MMA stages),
# 16-byte units of 16 int8 codes (MMA with I8), single bytes (reference
# kernel, 4-bit and int8).
PACKED_LOADS = {
    "GemvForwardKernel": {"ld.global.nc.v4.u32"},
    "GemvTransposeKernel": {"ld.global.nc.v2.u32"},
    "MmaKernel": {"ld.global.nc.v2.u32"},
    "ReferenceKernel": {"ld.global.nc.u8"},
}
PACKED_LOADS_INT8_MMA = {"ld.global.nc.v4.u32"}


def _forward_rows_per_warp(rows: int) -> int:
    return 4 if rows <= 4 else 2  # Forward<T, MR> in nf4_cuda_gemv.cu


def _expected_names() -> set:
    names = set()
    for t in DTYPES:
        for mr in GEMV_FORWARD_ROWS:
            r = _forward_rows_per_warp(mr)
            names.add(f"GemvForwardKernel<{t}, {mr}, {r}>")
        for mr in GEMV_TRANSPOSE_ROWS:
            names.add(f"GemvTransposeKernel<{t}, {mr}>")
        tf32 = "true" if t == "float" else "false"
        for bm in MMA_TILE_ROWS:
            for i8 in MMA_INT8:
                names.add(f"MmaKernel<{t}, MmaConfig<{bm}, {tf32}>, {i8}>")
        names.add(f"ReferenceKernel<{t}>")
        names.add(f"FinalizeKernel<{t}>")
    return names


def _mma_rows(record) -> int:
    return int(inspect_ptx.split_name(record["template_args"][1])[1][0])


def _mma_int8(record) -> bool:
    return record["template_args"][2] == "true"


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    config = inspect_ptx.cuda_config(list(ARCHS))
    if not config["enabled"]:
        reason = f"the CUDA kernels cannot be compiled here: {config['reason']}"
        if os.environ.get("KERAS_QLORA_REQUIRE_NVCC") == "1":
            pytest.fail(f"KERAS_QLORA_REQUIRE_NVCC=1 but {reason}")
        pytest.skip(
            f"{reason}. Install the CUDA toolkit (nvcc) or set "
            "KERAS_QLORA_REQUIRE_NVCC=1 to turn this skip into a failure."
        )
    return inspect_ptx.compile_report(
        list(ARCHS), tmp_path_factory.mktemp("ptx")
    )


def _of(records, *kernels):
    return [r for r in records if r["kernel"] in kernels]


def _where(record) -> str:
    return f"{record['name']} sm_{record['arch']}"


# ---------------------------------------------------------------- presence


def test_every_kernel_instantiation_is_compiled_for_each_arch(records):
    expected = _expected_names()
    assert len(expected) == 3 * (4 + 3 + 3 * 2 + 2)
    for arch in ARCHS:
        found = {r["name"] for r in records if r["arch"] == arch}
        assert not expected - found, f"sm_{arch} lacks {expected - found}"
        assert not found - expected, (
            f"sm_{arch} has kernels this test does not know (add them to "
            f"_expected_names and check them): {found - expected}"
        )
    assert len(records) == len(expected) * len(ARCHS)


# ---------------------------------------------------------------- loads


def test_every_global_load_is_traced_to_one_pointer(records):
    # The checks below are only as good as this tracing: each global load
    # of a kernel taking Nf4Args must derive from exactly one pointer
    # member (or a device table), never from several or from nothing.
    for r in _of(records, *PACKED_LOADS):
        sources = r["ptx"]["loads_by_source"]
        bad = {s: v for s, v in sources.items() if "+" in s or s == "?"}
        assert not bad, f"{_where(r)}: untraced loads {bad}"
        assert "loaded" not in sources, f"{_where(r)}: {sources}"


@pytest.mark.parametrize("kernel", sorted(PACKED_LOADS))
def test_packed_weights_are_read_with_the_intended_width(records, kernel):
    for r in _of(records, kernel):
        packed = r["ptx"]["loads_by_source"].get("packed", {})
        want = PACKED_LOADS[kernel]
        if kernel == "MmaKernel" and _mma_int8(r):
            want = PACKED_LOADS_INT8_MMA
        assert set(packed) == want, f"{_where(r)} reads W with {packed}"


def test_forward_gemv_reads_w_and_x_in_coalesced_128_bit_loads(records):
    for r in _of(records, "GemvForwardKernel"):
        sources = r["ptx"]["loads_by_source"]
        rows_per_warp = int(r["template_args"][2])
        # One 16-byte load per W^T row a warp owns, per chunk.
        assert sources["packed"]["ld.global.nc.v4.u32"] >= rows_per_warp
        assert all(".v4." in op for op in sources["x"]), (
            f"{_where(r)} reads x with {sources['x']}"
        )


def test_mma_reads_x_in_16_byte_vectors_when_aligned(records):
    for r in _of(records, "MmaKernel"):
        x = r["ptx"]["loads_by_source"]["x"]
        # The x_vec path: 16-byte vectors; the other: one element at a time.
        assert x.get("ld.global.nc.v4.u32", 0) >= 1, f"{_where(r)}: {x}"
        assert any(".v" not in op for op in x), f"{_where(r)}: {x}"


# ---------------------------------------------------------------- spills


def _spill_free(records):
    out = _of(
        records,
        "GemvForwardKernel",
        "GemvTransposeKernel",
        "ReferenceKernel",
        "FinalizeKernel",
    )
    mma = _of(records, "MmaKernel")
    return out + [r for r in mma if _mma_rows(r) != 128]


def test_kernels_keep_accumulators_in_registers(records):
    checked = _spill_free(records)
    assert len(checked) == (12 + 9 + 3 + 3 + 6 * 2) * len(ARCHS)
    for r in checked:
        usage = (r["spill_stores"], r["spill_loads"], r["stack_frame"])
        assert usage == (0, 0, 0), f"{_where(r)}: spill st/ld, stack {usage}"
        assert r["ptx"]["local"] == 0, f"{_where(r)} uses local memory"


def test_mma_128_row_tile_spills_stay_within_budget(records):
    big = [r for r in _of(records, "MmaKernel") if _mma_rows(r) == 128]
    assert len(big) == len(DTYPES) * len(MMA_INT8) * len(ARCHS)
    for r in big:
        for key, limit in MMA_128_SPILL_BUDGET.items():
            assert r[key] <= limit, f"{_where(r)}: {key} {r[key]} > {limit}"
        # ptxas' spills only: no array of the kernel lives in local memory.
        assert r["ptx"]["local"] == 0, f"{_where(r)} uses local memory"


# ---------------------------------------------------------------- mma


def test_mma_kernels_use_the_tensor_core_instruction_of_their_dtype(records):
    configs = inspect_ptx.layout_facts()["mma"]
    for r in _of(records, "MmaKernel"):
        dtype = r["template_args"][0]
        mma = r["ptx"]["mma"]
        assert set(mma) == {MMA_INSTRUCTION[dtype]}, f"{_where(r)}: {mma}"
        c = configs[f"{_mma_rows(r)},{int(dtype == 'float')}"]
        per_k_tile = c["bk"] // c["k_step"] * c["mi"] * c["ni"]
        count = mma[MMA_INSTRUCTION[dtype]]
        assert count >= per_k_tile and count % per_k_tile == 0, (
            f"{_where(r)}: {count} mma.sync, a k-tile has {per_k_tile}"
        )
        # TF32 operands are rounded by cvt.rna (x and the decoded W).
        if dtype == "float":
            assert r["ptx"]["cvt_tf32"] > 0, _where(r)
        else:
            assert r["ptx"]["cvt_tf32"] == 0, _where(r)


def test_only_mma_kernels_use_tensor_cores(records):
    for r in records:
        if r["kernel"] != "MmaKernel":
            assert r["ptx"]["mma"] == {}, _where(r)


# ---------------------------------------------------------------- budgets


def test_static_shared_memory_fits_one_block(records):
    for r in records:
        assert r["smem"] <= STATIC_SMEM_LIMIT, f"{_where(r)}: {r['smem']} B"


def test_two_mma_blocks_fit_one_sm(records):
    for r in _of(records, "MmaKernel"):
        bounds = (r["ptx"]["max_threads"], r["ptx"]["min_blocks"])
        assert bounds == (MMA_THREADS, MMA_MIN_BLOCKS), f"{_where(r)}: {bounds}"
        assert r["registers"] <= 128, _where(r)
        threads = MMA_MIN_BLOCKS * MMA_THREADS
        assert threads * r["registers"] <= REGISTERS_PER_SM, _where(r)
        shared = MMA_MIN_BLOCKS * (r["smem"] + RESERVED_SMEM_PER_BLOCK)
        assert shared <= SM_SHARED[r["arch"]], f"{_where(r)}: {shared} B"


def test_gemv_and_reference_launch_bounds_match_their_launches(records):
    layout = inspect_ptx.layout_facts()
    assert layout["mma_threads"] == MMA_THREADS
    threads = {
        "GemvForwardKernel": 128,  # kGemvForwardWarps * 32
        "GemvTransposeKernel": 256,  # kGemvTransposeWarps * 32
        "ReferenceKernel": 256,
        "FinalizeKernel": 256,
    }
    for r in _of(records, *threads):
        assert r["ptx"]["max_threads"] == threads[r["kernel"]], _where(r)


# ---------------------------------------------------------------- report


def test_table_and_json_hold_every_record(records):
    table = inspect_ptx.format_table(records).splitlines()
    assert len(table) == 2 + len(records)
    for line, r in zip(table[2:], records, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [
            f"`{r['name']}`",
            str(r["arch"]),
            str(r["registers"]),
        ]
    assert json.loads(json.dumps(records)) == records


# ---------------------------------------------------------------- parsers


def test_parse_resource_usage_reads_each_entry():
    text = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1fv' for 'sm_90'
ptxas info    : Function properties for _Z1fv
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem
ptxas info    : Compiling entry function '_Z1gv' for 'sm_80'
ptxas info    : Function properties for _Z1gv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, 380 bytes cmem[0]
"""
    usage = inspect_ptx.parse_resource_usage(text)
    assert usage == {
        ("_Z1fv", 90): dict(
            registers=40,
            spill_stores=4,
            spill_loads=12,
            stack_frame=8,
            smem=2048,
            barriers=1,
        ),
        ("_Z1gv", 80): dict(
            registers=12,
            spill_stores=0,
            spill_loads=0,
            stack_frame=0,
            smem=0,
            barriers=0,
        ),
    }


def test_ptx_facts_trace_loads_through_parameter_pointers():
    # Both ways nvcc addresses a by-value Nf4Args member: directly, and
    # through a register holding the parameter's address plus an offset.
    size = inspect_ptx.layout_facts()["nf4args_size"]
    offsets = inspect_ptx.layout_facts()["pointers"]
    header = (
        f".entry k(\n\t.param .align 8 .b8 k_param_0[{size}],\n"
        "\t.param .u64 k_param_1\n)\n.maxntid 128, 1, 1\n"
        ".minnctapersm 2\n"
    )
    body = f"""
\t.reg .b64 %rd<20>;
\tmov.b64 %rd1, k_param_0;
\tadd.s64 %rd2, %rd1, 8;
\tld.param.u64 %rd3, [%rd2+{offsets["x"] - 8}];
\tld.param.u64 %rd4, [k_param_0+{offsets["packed"]}];
\tld.param.u64 %rd9, [k_param_1];
\tcvta.to.global.u64 %rd5, %rd4;
$L__BB0_1:
\tadd.s64 %rd6, %rd5, %rd9;
\t@%p1 ld.global.nc.v4.u32 {{%r1, %r2, %r3, %r4}}, [%rd6+16];
\tld.global.nc.v4.f32 {{%f1, %f2, %f3, %f4}}, [%rd3];
\tld.local.u32 %r5, [%rd7];
\tmma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {{%f1,%f2,%f3,%f4}}, {{%r1,%r2,%r3,%r4}}, {{%r1,%r2}}, {{%f1,%f2,%f3,%f4}};
\tbra.uni $L__BB0_1;
"""  # noqa: E501
    facts = inspect_ptx.ptx_facts(header, body)
    assert facts["loads_by_source"] == {
        "packed": {"ld.global.nc.v4.u32": 1},
        "x": {"ld.global.nc.v4.f32": 1},
    }
    assert facts["v4_global_loads"] == 2
    assert facts["local"] == 1
    assert facts["mma"] == {
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32": 1
    }
    assert (facts["max_threads"], facts["min_blocks"]) == (128, 2)
