"""The catalog of bad inputs: every public entry point, one outcome each.

Each `Case` names the public entry point it exercises (`apply`,
`load_adapter`, `nf4_matmul`, ...), runs one bad input, misuse or fault
against it, and says what must happen:

- `Refused(error, match, names)`: the call raises `error` (a specific
  type), its message matches `match` and contains every string of `names`
  (the argument, layer or file it is about: "{tmp}" stands for the case's
  folder);
- `Correct()`: the call is legitimate or is handled; `run` itself asserts
  the result (e.g. that a failed write left the previous files
  byte-identical, see `files_kept`).

`outcome(case)` classifies a run as "clear error", "correct" or "other"
(anything else: another exception type, an unmatched message, an input
accepted that should not be, a failed assertion, a process killed by a
signal, a hang). Cases marked `isolate=True`, where a crash is possible
(native code, a corrupt shared library), run in a child process with a time
bound.

`tests/robustness/test_catalog.py` requires every case to be a clear error
or correct. The counts by outcome, per entry point:

    python tests/robustness/catalog.py            # all cases
    python tests/robustness/catalog.py --list     # ids only
"""

import contextlib
import dataclasses
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable

OUTCOMES = ("clear error", "correct", "other")
CHILD_TIMEOUT_S = 300
ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Refused:
    """The call must raise `error` with a message matching `match` (regex,
    searched) that contains each of `names`."""

    error: type | tuple
    match: str
    names: tuple = ()


@dataclasses.dataclass(frozen=True)
class Correct:
    """The call must complete; `run` asserts that the result is right."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input against one public entry point.

    Attributes:
        entry: the public entry point, e.g. "apply" or "load_adapter".
        name: what is wrong, short and unique within `entry`.
        run: `run(tmp)` performs the call; `tmp` is a fresh folder.
        expect: `Refused(...)` or `Correct()`.
        isolate: run in a child process (a crash is possible).
        needs: modules the case imports that the base install lacks (e.g.
            "bitsandbytes"); absent, the case is skipped with the reason.
    """

    entry: str
    name: str
    run: Callable
    expect: Refused | Correct
    isolate: bool = False
    needs: tuple = ()

    @property
    def id(self) -> str:
        return f"{self.entry}: {self.name}"


def files_kept(folder):
    """Context manager: asserts that every file under `folder` is
    byte-identical (and no file added or removed) when the block exits,
    whether or not it raised."""

    def snapshot():
        root = pathlib.Path(folder)
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    @contextlib.contextmanager
    def guard():
        before = snapshot()
        assert before, f"nothing to keep under {folder}"
        try:
            yield
        finally:
            after = snapshot()
            changed = sorted(
                set(before) ^ set(after)
                | {
                    k
                    for k in before.keys() & after.keys()
                    if before[k] != after[k]
                }
            )
            assert not changed, f"files changed by a failed write: {changed}"

    return guard()


def missing_needs(case) -> list:
    """The modules of `case.needs` that cannot be imported here."""
    missing = []
    for module in case.needs:
        try:
            importlib.import_module(module)
        except Exception:  # ImportError, or a broken native library
            missing.append(module)
    return missing


def case_modules() -> list:
    """Names of the modules holding the cases: every `cases_*.py` next to
    this file (each defines CASES, a list of Case)."""
    here = pathlib.Path(__file__).resolve().parent
    return sorted(p.stem for p in here.glob("cases_*.py"))


def load_cases() -> list:
    """Every case of `case_modules()`, ids unique."""
    cases = []
    for name in case_modules():
        cases.extend(importlib.import_module(f"{__package__}.{name}").CASES)
    ids = [c.id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"duplicate case ids: {duplicates}"
    return cases


def classify(case, error) -> tuple:
    """`(outcome, detail)` for a run that raised `error` (None: returned)."""
    expect = case.expect
    if error is None:
        if isinstance(expect, Correct):
            return "correct", ""
        return "other", "accepted: no error raised"
    message = str(error)
    text = f"{type(error).__name__}: {message}"[:600]
    if isinstance(expect, Correct):
        return "other", text
    if not isinstance(error, expect.error):
        return "other", f"wrong type, wanted {expect.error}: {text}"
    if not re.search(expect.match, message, re.DOTALL):
        return "other", f"message does not match {expect.match!r}: {text}"
    return "clear error", text


def run_here(case, tmp) -> tuple:
    """Runs `case` in this process; returns `(outcome, detail)`."""
    names = ()
    if isinstance(case.expect, Refused):
        names = tuple(n.replace("{tmp}", str(tmp)) for n in case.expect.names)
    try:
        case.run(pathlib.Path(tmp))
    except Exception as error:  # noqa: BLE001 - every failure is classified
        kind, detail = classify(case, error)
        if kind == "clear error":
            absent = [n for n in names if n not in str(error)]
            if absent:
                return "other", f"message does not name {absent}: {detail}"
        elif kind == "other" and isinstance(error, AssertionError):
            detail += "\n" + traceback.format_exc(limit=3)[-800:]
        return kind, detail
    return classify(case, None)


def run_in_child(case, tmp) -> tuple:
    """Runs `case` in a fresh Python process: a signal or a hang is an
    outcome ("other"), not the end of the test run."""
    cmd = [sys.executable, str(pathlib.Path(__file__)), "--child", case.id]
    try:
        proc = subprocess.run(
            cmd,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env=dict(os.environ, KQ_CATALOG_TMP=str(tmp)),
        )
    except subprocess.TimeoutExpired:
        return "other", f"hung: no result after {CHILD_TIMEOUT_S} s"
    if proc.returncode < 0:
        return "other", f"the process died with signal {-proc.returncode}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return "other", f"child exit {proc.returncode}: {proc.stderr[-800:]}"
    result = json.loads(lines[-1])
    return result["outcome"], result["detail"]


def outcome(case, tmp) -> tuple:
    """`(outcome, detail)` of `case`, run in `tmp` (a fresh folder)."""
    return (run_in_child if case.isolate else run_here)(case, tmp)


def _main(argv):
    if argv[:1] == ["--child"]:
        by_id = {c.id: c for c in load_cases()}
        kind, detail = run_here(by_id[argv[1]], os.environ["KQ_CATALOG_TMP"])
        print(json.dumps({"outcome": kind, "detail": detail}))
        return 0
    cases = load_cases()
    if argv[:1] == ["--list"]:
        print("\n".join(c.id for c in cases))
        return 0
    counts, others, skipped = {}, [], []
    for case in cases:
        missing = missing_needs(case)
        if missing:
            skipped.append(f"{case.id} (needs {', '.join(missing)})")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            kind, detail = outcome(case, tmp)
        row = counts.setdefault(case.entry, dict.fromkeys(OUTCOMES, 0))
        row[kind] += 1
        if kind == "other":
            others.append(f"{case.id}: {detail}")
    if not counts:
        print("no case ran")
        return 1
    width = max(len(e) for e in counts)
    print(f"{'entry point':<{width}}  " + "  ".join(OUTCOMES))
    for entry, row in counts.items():
        print(
            f"{entry:<{width}}  "
            + "  ".join(f"{row[k]:>{len(k)}}" for k in OUTCOMES)
        )
    totals = {k: sum(r[k] for r in counts.values()) for k in OUTCOMES}
    print(
        f"{'total':<{width}}  "
        + "  ".join(f"{totals[k]:>{len(k)}}" for k in OUTCOMES)
        + f"   ({sum(totals.values())} cases, {len(skipped)} skipped)"
    )
    for line in skipped:
        print("skipped:", line)
    for line in others:
        print("OTHER:", line)
    return 1 if others else 0


if __name__ == "__main__":
    # Run as a script (and in the child processes): import this file as
    # `robustness.catalog`, as pytest does, so that the case modules'
    # `from .catalog import ...` and `classify` see the same classes.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from robustness import catalog

    sys.exit(catalog._main(sys.argv[1:]))
