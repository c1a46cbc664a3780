"""The layout of the op's sources: what wheels ship, one home per helper.

- Wheels carry custom_ops/ without testing/ (the CPU stand-ins for CUDA
  that only the tests and the GPU harness build): setup.py copies the
  sources with `keras_qlora.ops.build.copy_sources`.
- The NF4 format helpers (block sizes, double-quant scale, size
  arithmetic) are defined once, in custom_ops/include/nf4_format.h.
- Imports point down: keras_qlora.quantizers never imports keras_qlora.ops.
"""

import ast
import pathlib
import re

from keras_qlora.ops import build

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "keras_qlora"


def test_wheel_sources_exclude_the_testing_stand_ins(tmp_path):
    shipped = build.copy_sources(build.source_dir(), tmp_path / "_custom_ops")
    assert shipped, "nothing copied"
    assert not [p for p in shipped if p.split("/")[0] == "testing"]
    assert "include/nf4_format.h" in shipped
    root = build.source_dir()
    needed = build.source_files() + build.cuda_source_files()
    assert {str(p.relative_to(root)) for p in needed} <= set(shipped)
    # The stand-ins exist in the repository, so the check above means
    # something.
    assert list((root / "testing" / "cuda_sim").glob("*.cc"))
    assert list((root / "testing" / "cuda_emulator").glob("*.cc"))


def test_format_helpers_have_one_definition():
    root = build.source_dir()
    definitions = {
        "allowed block sizes": r"==\s*32\s*\|\|",
        "DoubleQuantScale": r"float\s+DoubleQuantScale\s*\(",
        "CeilDiv": r"int64_t\s+CeilDiv\s*\(",
        "MulRn": r"float\s+MulRn\s*\(",
        "kNestedBlockSize": r"kNestedBlockSize\s*=",
    }
    sources = [
        p
        for p in root.rglob("*")
        if p.suffix in (".h", ".cc", ".cu", ".cuh")
    ]
    for name, pattern in definitions.items():
        found = [
            str(p.relative_to(root))
            for p in sources
            if re.search(pattern, p.read_text())
        ]
        assert found == ["include/nf4_format.h"], (name, found)


def test_quantizers_do_not_import_ops():
    for path in (PACKAGE / "quantizers").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not [n for n in names if n.startswith("keras_qlora.ops")], (
                path.name
            )


def test_ops_modules_stay_small_and_init_only_reexports():
    for path in (PACKAGE / "ops").glob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines < 600, (path.name, lines)
    tree = ast.parse((PACKAGE / "ops" / "__init__.py").read_text())
    for node in tree.body:
        is_doc = isinstance(node, ast.Expr) and isinstance(
            node.value, ast.Constant
        )
        is_all = isinstance(node, ast.Assign) and [
            t.id for t in node.targets
        ] == ["__all__"]
        assert isinstance(node, ast.ImportFrom) or is_doc or is_all, (
            ast.dump(node)[:200]
        )
