"""Compile-only inspection of the CUDA NF4 kernels (no GPU needed).

Compiles custom_ops/cuda/*.cu exactly as the op library does (nvcc path,
flags and -gencode targets come from keras_qlora/ops/build.py, loaded by
path through build.py, so no TensorFlow is needed), adding
`--resource-usage --keep`. For each kernel instantiation and sm_XX this
gives:

- from ptxas: registers, spill store / load bytes, stack frame, static
  shared memory;
- from the kept PTX (the very PTX that ptxas assembled, the same text
  `nvcc -ptx` writes): the global loads by width, and by which pointer of
  `Nf4Args` they read (a backward slice of each load's address through the
  PTX registers to the kernel parameter it starts from, so "packed weights
  read with ld.global.nc.v4.u32" is checked, not guessed), the `mma.sync`
  kinds and counts, `cvt.rna.tf32.f32`, local memory (`ld.local` /
  `st.local` / `.local`), and the launch bounds (`.maxntid`,
  `.minnctapersm`).

`Nf4Args`' pointer offsets and the `MmaConfig` tiles are read from the
headers by a tiny g++ program (`layout_facts()`), not copied here.

Usage:
    python benchmarks/gpu/inspect_ptx.py [--archs "80;90"] [--json]

Prints one Markdown table (or, with `--json`, the records of
`compile_report()`) and exits non-zero when nvcc is missing or a compile
fails. tests/ops/test_cuda_ptx.py asserts properties of the same records.
"""

import argparse
import collections
import functools
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
# Pointer members of Nf4Args (nf4_cuda_math.h); their offsets come from g++.
POINTER_FIELDS = tuple(
    "x packed absmax_f32 absmax_u8 nested offset y workspace".split()
)
MMA_TILE_ROWS = (16, 64, 128)  # MmaKernel variants (nf4_cuda_mma.cu)
DTYPE_ORDER = {"float": 0, "__nv_bfloat16": 1, "__half": 2}
KERNEL_ORDER = tuple(
    "GemvForwardKernel GemvTransposeKernel MmaKernel ReferenceKernel "
    "FinalizeKernel".split()
)

_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)")
_PROPS_RE = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads"
)
_USAGE_KEYS = tuple(
    "registers spill_stores spill_loads stack_frame smem barriers".split()
)
_USED_RE = re.compile(r"Used (\d+) registers")
_SMEM_RE = re.compile(r"(\d+) bytes smem")
_BARRIERS_RE = re.compile(r"used (\d+) barriers")
_PTX_ENTRY_RE = re.compile(
    r"^(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$]+)\s*\(", re.M
)
_REG_RE = re.compile(r"%[A-Za-z_]\w*")
_ADDRESS_RE = re.compile(r"^\[\s*([%\w$]+)\s*(?:\+\s*(-?\d+))?\s*\]$")
_LABEL_RE = re.compile(r"^(?:[\w$]+:\s*)+")
# Instructions that write no register (their first operand is an input).
_NO_DEST = ("st.", "red.", "bar", "bra", "ret", "exit", "membar", "fence")


@functools.cache
def library_module():
    """keras_qlora/ops/build.py, loaded by path by build.py's helper."""
    path = HERE / "build.py"
    spec = importlib.util.spec_from_file_location("_kq_gpu_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.load_library_module()


def cuda_config(archs=None) -> dict:
    """The op library's CUDA configuration for `archs` (default: its own).

    Args:
        archs: compute capabilities, e.g. `[80, 90]`; None: the library's
            default ("80;90"), whatever GPU this machine has.

    Returns:
        `build.cuda_config()`'s dict: `enabled`, `reason`, and when
        enabled `nvcc`, `version` and `archs`.
    """
    toolchain = library_module().cuda_toolchain
    if archs is None:
        archs = toolchain.parse_archs(toolchain.DEFAULT_ARCHS)
    return dict(toolchain.config(toolchain.arch_text(archs)))


def nvcc_command(config: dict, source, keep_dir, output) -> list:
    """The op library's nvcc command for `source`, with resource usage.

    Same flags and -gencode targets as `build._start_cuda_compiles`,
    plus `--resource-usage --keep --keep-dir keep_dir`.
    """
    toolchain = library_module().cuda_toolchain
    cmd = [config["nvcc"], "-c", *toolchain.NVCC_FLAGS]
    cmd += toolchain.gencode_flags(config["archs"])
    cxx = os.environ.get("CXX")
    if cxx:
        cmd += ["-ccbin", cxx]
    cmd += ["--resource-usage", "--keep", "--keep-dir", str(keep_dir)]
    return cmd + [str(source), "-o", str(output)]


# ---------------------------------------------------------------- layout

_MMA_CONSTANTS = dict(
    bm="kBM", bn="kBN", bk="kBK", k_step="kKStep", mi="kMI", ni="kNI",
    stride="kStride", op_bytes="kOpBytes",
)  # fmt: skip


@functools.cache
def layout_facts() -> dict:
    """Facts of the headers, from a g++ program built against them.

    Returns:
        `nf4args_size` (bytes), `pointers` (member name -> byte offset in
        `Nf4Args`), `mma_threads`, and `mma`: "BM,TF32" (e.g. "128,0") ->
        the MmaConfig constants `bm`, `bn`, `bk`, `k_step`, `mi`, `ni`,
        `stride`, `op_bytes`.

    Raises:
        RuntimeError: the program does not compile (a member was renamed).
    """
    lines = [
        'P("nf4args_size", sizeof(Nf4Args));',
        'P("mma_threads", kMmaThreads);',
    ]
    lines += [
        f'P("pointers.{n}", offsetof(Nf4Args, {n}));' for n in POINTER_FIELDS
    ]
    for bm in MMA_TILE_ROWS:
        for tf32 in (0, 1):
            config = f"MmaConfig<{bm}, {'true' if tf32 else 'false'}>"
            lines += [
                f'P("mma.{bm},{tf32}.{key}", {config}::{constant});'
                for key, constant in _MMA_CONSTANTS.items()
            ]
    program = "\n".join([
        "#include <cstddef>",
        "#include <cstdio>",
        '#include "nf4_cuda_math.h"',
        "using namespace keras_qlora::nf4_cuda;",
        "void P(const char* k, long long v) {",
        '  std::printf("%s %lld\\n", k, v);',
        "}",
        "int main() {", *lines, "}", "",
    ])  # fmt: skip
    include = library_module().source_dir() / "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = pathlib.Path(tmp, "layout.cc"), pathlib.Path(tmp, "layout")
        src.write_text(program)
        cxx = os.environ.get("CXX", "g++")
        cmd = [cxx, "-std=c++17", f"-I{include}", str(src), "-o", str(exe)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"layout program failed:\n{proc.stderr[-3000:]}")
        out = subprocess.run([exe], capture_output=True, text=True, check=True)
    facts = {}
    for line in out.stdout.splitlines():  # "mma.16,0.bk 64" -> nested dicts
        key, value = line.split()
        *path, last = key.split(".")
        node = facts
        for part in path:
            node = node.setdefault(part, {})
        node[last] = int(value)
    return facts


# ---------------------------------------------------------------- names


def demangle(names) -> dict:
    """Mangled -> short name (`GemvForwardKernel<float, 8, 2>`).

    Uses c++filt (binutils, next to the host compiler that nvcc needs);
    without it the names stay mangled. Namespaces and the parameter list
    are dropped.
    """
    names, cxxfilt = list(names), shutil.which("c++filt")
    if not names or cxxfilt is None:
        return {n: n for n in names}
    out = subprocess.run(
        [cxxfilt],
        input="\n".join(names) + "\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return {n: _shorten(d) for n, d in zip(names, out, strict=True)}


def _shorten(demangled: str) -> str:
    text = demangled.removeprefix("void ").strip()
    text = text.replace("(anonymous namespace)::", "")
    text = re.sub(r"\([^()]*\)$", "", text)  # the parameter list
    return re.sub(r"\b\w+::", "", text).replace("> >", ">>")


def _symbol_name(symbol: str) -> str:
    """'_ZN...8kDevCodeE' -> 'kDevCode': the last part of a nested name."""
    rest, name = symbol.removeprefix("_ZN"), symbol
    while match := re.match(r"\d+", rest):
        size, skip = int(match.group(0)), len(match.group(0))
        name, rest = rest[skip : skip + size], rest[skip + size :]
    return name


def _split_top(text: str) -> list:
    """Splits at commas outside {}, [] and <> (operands, template args)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        depth += {"{": 1, "[": 1, "<": 1, "}": -1, "]": -1, ">": -1}.get(ch, 0)
        current += ch
    return parts + [current.strip()] if current.strip() else parts


def split_name(short: str):
    """'MmaKernel<float, MmaConfig<16, true>>' -> ('MmaKernel', [args])."""
    head, _, rest = short.partition("<")
    return head, _split_top(rest[:-1]) if rest else []


# ---------------------------------------------------------------- ptxas


def parse_resource_usage(text: str) -> dict:
    """ptxas `--resource-usage` output -> {(mangled, arch): usage}.

    Each usage dict has `registers`, `spill_stores`, `spill_loads`,
    `stack_frame`, `smem` (static shared bytes) and `barriers`.
    """
    records, current = {}, None
    for line in text.splitlines():
        match = _ENTRY_RE.search(line)
        if match:
            current = dict.fromkeys(_USAGE_KEYS, 0)
            records[(match.group(1), int(match.group(2)))] = current
            continue
        if current is None:
            continue
        match = _PROPS_RE.search(line)
        if match:
            current["stack_frame"] = int(match.group(1))
            current["spill_stores"] = int(match.group(2))
            current["spill_loads"] = int(match.group(3))
        match = _USED_RE.search(line)
        if match:
            current["registers"] = int(match.group(1))
            smem = _SMEM_RE.search(line)
            current["smem"] = int(smem.group(1)) if smem else 0
            barriers = _BARRIERS_RE.search(line)
            current["barriers"] = int(barriers.group(1)) if barriers else 0
    return records


# ---------------------------------------------------------------- PTX


def ptx_entries(ptx: str) -> dict:
    """PTX text -> {mangled entry name: (header, body)}."""
    entries = {}
    for match in _PTX_ENTRY_RE.finditer(ptx):
        open_brace = ptx.index("\n{", match.end())
        close = ptx.index("\n}", open_brace)
        entries[match.group(1)] = (
            ptx[match.start() : open_brace],
            ptx[open_brace + 2 : close],
        )
    return entries


def _instructions(body: str) -> list:
    """(opcode, operands) of a PTX body, without labels and directives."""
    body = re.sub(r"//[^\n]*", "", body)
    out = []
    for chunk in body.split(";"):
        text = _LABEL_RE.sub("", chunk.strip().lstrip("{}").strip())
        text = text.lstrip("{}").strip()
        if not text or text.startswith("."):
            continue
        if text.startswith("@"):
            text = text.split(None, 1)[1] if " " in text else ""
        opcode, *rest = re.split(r"\s+", text, maxsplit=1)
        out.append((opcode, _split_top(rest[0] if rest else "")))
    return out


class _Slicer:
    """Which kernel parameter each register derives from (address slices)."""

    def __init__(self, instructions, struct_param: bool):
        self.defs = collections.defaultdict(list)
        self.struct_param = struct_param
        for opcode, ops in instructions:
            if ops and not opcode.startswith(_NO_DEST):
                for reg in _REG_RE.findall(ops[0]):
                    self.defs[reg].append((opcode, ops))
        self.fields = {v: k for k, v in layout_facts()["pointers"].items()}

    def param_pointers(self, reg, seen=None) -> set:
        """(param index, byte offset) values a register may hold."""
        seen = set() if seen is None else seen
        if reg in seen:
            return set()
        seen.add(reg)
        out = set()
        for opcode, ops in self.defs.get(reg, ()):
            src = ops[1] if len(ops) > 1 else ""
            param = re.fullmatch(r"[\w$]+_param_(\d+)", src)
            if opcode.startswith(("mov.", "cvta.param")) and param:
                out.add((int(param.group(1)), 0))
            elif opcode.startswith(("mov.", "cvta.param")) and src in self.defs:
                out |= self.param_pointers(src, seen)
            elif opcode.startswith("add.") and len(ops) == 3:
                if re.fullmatch(r"-?\d+", ops[2]):
                    for p, off in self.param_pointers(ops[1], seen):
                        out.add((p, off + int(ops[2])))
        return out

    def _param_field(self, address: str) -> set:
        match = _ADDRESS_RE.match(address.strip())
        if match is None:
            return {"?"}
        base, offset = match.group(1), int(match.group(2) or 0)
        param = re.fullmatch(r"[\w$]+_param_(\d+)", base)
        if param:
            places = {(int(param.group(1)), 0)}
        else:
            places = self.param_pointers(base)
        out = set()
        for p, off in places:
            if not self.struct_param:
                out.add(f"param{p}")
            elif p == 0 and off + offset in self.fields:
                out.add(self.fields[off + offset])
            # Else a size: Nf4Args' other members, or a kernel parameter
            # after it (all of them are integers).
        return out

    def sources(self, address: str) -> set:
        """Kernel parameters (or global symbols) an address derives from."""
        match = _ADDRESS_RE.match(address.strip())
        if match is None:
            return {"?"}
        base = match.group(1)
        if not base.startswith("%"):
            return {_symbol_name(base)}
        out, seen, todo = set(), set(), [base]
        while todo:
            reg = todo.pop()
            if reg in seen:
                continue
            seen.add(reg)
            for opcode, ops in self.defs.get(reg, ()):
                if opcode.startswith("ld.param"):
                    out |= self._param_field(ops[1])
                elif opcode.startswith("ld."):
                    out.add("loaded")  # an address read from memory
                else:
                    for op in ops[1:]:
                        regs = _REG_RE.findall(op)
                        # Values only: a predicate (selp's condition) is
                        # no part of the address.
                        todo += [r for r in regs if not r.startswith("%p")]
                        symbol = re.fullmatch(r"[A-Za-z_$][\w$]*", op)
                        if not regs and symbol and "_param_" not in op:
                            out.add(_symbol_name(op))
        return out or {"?"}


def ptx_facts(header: str, body: str) -> dict:
    """Facts of one PTX entry (see the module docstring).

    Returns:
        A dict: `global_loads` (opcode -> count), `loads_by_source`
        (what the address derives from: a pointer member of Nf4Args,
        `paramN` for kernels without Nf4Args, a global's name (e.g.
        `kDevCode`), "loaded" for an address read from memory, "?" when
        not found; "a+b" when it mixes several -> opcode -> count),
        `v4_global_loads`, `mma` (opcode -> count), `cvt_tf32`,
        `local` (ld.local / st.local instructions plus .local
        declarations), `max_threads` and `min_blocks` (launch bounds).
    """
    # Is the first parameter an Nf4Args (a byte array of its size)?
    size = layout_facts()["nf4args_size"]
    struct_param = re.search(rf"_param_0\[{size}\]", header) is not None
    instructions = _instructions(body)
    slicer = _Slicer(instructions, struct_param)
    loads = collections.Counter()
    by_source = collections.defaultdict(collections.Counter)
    mma = collections.Counter()
    local = len(re.findall(r"^\s*\.local\b", body, re.M))
    cvt_tf32 = 0
    for opcode, ops in instructions:
        if opcode.startswith("ld.global"):
            loads[opcode] += 1
            source = "+".join(sorted(slicer.sources(ops[-1])))
            by_source[source][opcode] += 1
        elif opcode.startswith("mma."):
            mma[opcode] += 1
        elif opcode.startswith(("ld.local", "st.local")):
            local += 1
        elif opcode == "cvt.rna.tf32.f32":
            cvt_tf32 += 1
    threads = re.search(r"\.maxntid\s+(\d+)", header)
    min_blocks = re.search(r"\.minnctapersm\s+(\d+)", header)
    return dict(
        global_loads=dict(loads),
        loads_by_source={k: dict(v) for k, v in sorted(by_source.items())},
        v4_global_loads=sum(n for op, n in loads.items() if ".v4." in op),
        mma=dict(mma),
        cvt_tf32=cvt_tf32,
        local=local,
        max_threads=int(threads.group(1)) if threads else None,
        min_blocks=int(min_blocks.group(1)) if min_blocks else None,
    )


# ---------------------------------------------------------------- report


def _sort_key(record: dict):
    kernel, args = record["kernel"], record["template_args"]
    family = KERNEL_ORDER.index(kernel) if kernel in KERNEL_ORDER else 99
    dtype = DTYPE_ORDER.get(args[0], 9) if args else 9
    numbers = [int(n) for n in re.findall(r"\d+", ",".join(args[1:]))]
    return family, dtype, numbers, record["name"], record["arch"]


def compile_report(archs=None, work_dir=None) -> list:
    """Compiles every .cu file and reports each kernel instantiation.

    The files compile in parallel (one nvcc per file, all architectures in
    it, as the op library builds them).

    Args:
        archs: compute capabilities, e.g. `[80, 90]`; default "80;90".
        work_dir: folder for objects and kept intermediates (PTX);
            default a temporary folder, removed afterwards.

    Returns:
        One dict per (kernel instantiation, arch), sorted by kernel: `name`
        (short demangled), `kernel`, `template_args`, `mangled`, `source`
        (.cu file), `arch`, the ptxas usage of `parse_resource_usage()` and
        the PTX facts of `ptx_facts()` under `ptx`.

    Raises:
        RuntimeError: nvcc is missing, or a compile failed.
    """
    config = cuda_config(archs)
    if not config["enabled"]:
        raise RuntimeError(f"cannot compile CUDA kernels: {config['reason']}")
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="kq_ptx_") as tmp:
            return compile_report(config["archs"], tmp)
    work_dir = pathlib.Path(work_dir)
    jobs = []
    for src in library_module().cuda_source_files():
        keep = work_dir / src.stem
        keep.mkdir(parents=True, exist_ok=True)
        cmd = nvcc_command(config, src, keep, keep / (src.stem + ".o"))
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        jobs.append((src, keep, proc))
    usage, ptx = {}, {}
    failures = []
    for src, keep, proc in jobs:
        out = proc.communicate()[0]
        if proc.returncode != 0:
            failures.append(f"compiling {src.name} failed:\n{out[-4000:]}")
            continue
        for (name, arch), record in parse_resource_usage(out).items():
            usage[(name, arch)] = dict(record, source=src.name)
        for arch in config["archs"]:
            path = keep / f"{src.stem}.compute_{arch}.ptx"
            if len(config["archs"]) == 1:  # then nvcc names it plainly
                path = keep / f"{src.stem}.ptx"
            for name, parts in ptx_entries(path.read_text()).items():
                ptx[(name, arch)] = parts
    if failures:
        raise RuntimeError("\n".join(failures))
    missing = sorted(set(usage) ^ set(ptx))
    if missing:
        raise RuntimeError(f"ptxas and PTX list different kernels: {missing}")
    names = demangle(sorted({name for name, _ in usage}))
    records = []
    for (mangled, arch), record in usage.items():
        kernel, args = split_name(names[mangled])
        records.append(
            dict(
                name=names[mangled],
                kernel=kernel,
                template_args=args,
                mangled=mangled,
                arch=arch,
                **record,
                ptx=ptx_facts(*ptx[(mangled, arch)]),
            )
        )
    return sorted(records, key=_sort_key)


_MMA_SHORT = re.compile(r"mma\.sync\.aligned\.(\w+)\.row\.col\.f32\.(\w+)")


def _counts(counts: dict, short) -> str:
    return " ".join(f"{short(k)} x{n}" for k, n in sorted(counts.items()))


def _mma_short(opcode: str) -> str:
    match = _MMA_SHORT.match(opcode)
    return " ".join(match.groups()) if match else opcode


def format_table(records: list) -> str:
    """The records as one Markdown table (one row per kernel and arch)."""
    rows = [
        "| kernel | sm | regs | spill st/ld B | stack B | smem B | v4 ld "
        "| W (packed) loads | mma.sync | local |",
        "|" + " --- |" * 10,
    ]
    for r in records:
        ptx = r["ptx"]
        packed = ptx["loads_by_source"].get("packed", {})
        packed = _counts(packed, lambda k: k.removeprefix("ld.global."))
        rows.append(
            f"| `{r['name']}` | {r['arch']} | {r['registers']} "
            f"| {r['spill_stores']}/{r['spill_loads']} | {r['stack_frame']} "
            f"| {r['smem']} | {ptx['v4_global_loads']} | {packed or '-'} "
            f"| {_counts(ptx['mma'], _mma_short) or '-'} | {ptx['local']} |"
        )
    return "\n".join(rows)


def _notes(records: list) -> list:
    return [
        f"{r['name']} sm_{r['arch']}: spill st/ld {r['spill_stores']}/"
        f"{r['spill_loads']} B, stack {r['stack_frame']} B, "
        f"{r['ptx']['local']} local-memory instructions in PTX"
        for r in records
        if any((r["spill_stores"], r["spill_loads"], r["stack_frame"]))
        or r["ptx"]["local"]
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archs",
        help="compute capabilities, e.g. '80;90' (default: the op "
        "library's DEFAULT_ARCHS)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the records as JSON"
    )
    args = parser.parse_args(argv)
    toolchain = library_module().cuda_toolchain
    archs = args.archs and toolchain.parse_archs(args.archs)
    try:
        records = compile_report(archs)
    except (RuntimeError, ValueError) as err:
        print(f"inspect_ptx: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    config = cuda_config(archs)
    print(f"nvcc {config['version']}, sm {config['archs']}")
    print(format_table(records))
    print(
        "\nspills / local memory:", *(_notes(records) or ["none"]), sep="\n- "
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
