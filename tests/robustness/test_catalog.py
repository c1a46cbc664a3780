"""Every case of the bad-input catalog (catalog.py) is a clear error or
correct behaviour: never another exception, a silent acceptance, a lost
file, a crash or a hang."""

import os

import pytest

from . import catalog

CASES = catalog.load_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case, tmp_path):
    missing = catalog.missing_needs(case)
    if missing:
        reason = f"{case.id} needs {', '.join(missing)}, not installed"
        if os.environ.get("KERAS_QLORA_REQUIRE_BNB") == "1":
            pytest.fail(f"KERAS_QLORA_REQUIRE_BNB=1 but {reason}")
        pytest.skip(reason)
    kind, detail = catalog.outcome(case, tmp_path)
    assert kind in ("clear error", "correct"), detail


def _case(expect):
    return catalog.Case("self-test", "x", lambda tmp: None, expect)


def test_the_classifier_tells_outcomes_apart():
    refused = catalog.Refused(ValueError, r"rank must", names=("rank",))
    assert catalog.classify(_case(refused), None)[0] == "other"
    assert catalog.classify(_case(refused), TypeError("rank must"))[0] == (
        "other"
    )
    assert catalog.classify(_case(refused), ValueError("bad"))[0] == "other"
    kind = catalog.classify(_case(refused), ValueError("rank must be > 0"))
    assert kind[0] == "clear error"
    assert catalog.classify(_case(catalog.Correct()), None)[0] == "correct"
    assert catalog.classify(_case(catalog.Correct()), KeyError(1))[0] == (
        "other"
    )


def test_a_lost_file_or_a_missing_name_is_other(tmp_path):
    (tmp_path / "good").write_bytes(b"1")

    def overwrite(tmp):
        with catalog.files_kept(tmp):
            (tmp / "good").write_bytes(b"2")
            raise ValueError("write failed for rank")

    case = catalog.Case(
        "self-test", "lost", overwrite, catalog.Refused(ValueError, "failed")
    )
    assert catalog.run_here(case, tmp_path)[0] == "other"
    case = catalog.Case(
        "self-test",
        "unnamed",
        lambda tmp: (_ for _ in ()).throw(ValueError("failed")),
        catalog.Refused(ValueError, "failed", names=("alpha",)),
    )
    assert catalog.run_here(case, tmp_path)[0] == "other"
