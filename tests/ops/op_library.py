"""The fused op library for the op tests (run by pytest, and by the tests'
own subprocesses as scripts): loaded, or skipped under
KERAS_QLORA_PURE_TF=1, or a failure naming why it did not load."""

import os

import pytest


def load_library():
    from keras_qlora.ops import loader

    module = loader.load()
    if module is None:
        if os.environ.get("KERAS_QLORA_PURE_TF") == "1":
            pytest.skip("KERAS_QLORA_PURE_TF=1: the fused op is not loaded")
        pytest.fail(f"the fused op library did not load: {loader.status()}")
    return module
