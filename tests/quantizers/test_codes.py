"""Code tables: NF4 values and the 8-bit dynamic map."""

import numpy as np
import pytest

from keras_qlora.quantizers import NF4_CODE
from keras_qlora.quantizers import codes
from keras_qlora.quantizers import dynamic_map


def test_nf4_code_shape_order_and_anchors():
    assert NF4_CODE.dtype == np.float32
    assert NF4_CODE.shape == (16,)
    assert np.all(np.diff(NF4_CODE) > 0)
    assert NF4_CODE[0] == -1.0
    assert NF4_CODE[codes.NF4_ZERO_INDEX] == 0.0
    assert NF4_CODE[15] == 1.0


def test_nf4_code_is_read_only():
    with pytest.raises(ValueError, match="read-only"):
        NF4_CODE[0] = 0.5


def test_nf4_midpoints_lie_between_codes():
    mids = codes.NF4_MIDPOINTS
    assert mids.dtype == np.float32 and mids.shape == (15,)
    assert np.all(mids > NF4_CODE[:-1]) and np.all(mids < NF4_CODE[1:])


def test_dynamic_map_shape_range_and_anchors():
    table = dynamic_map()
    assert table.dtype == np.float32 and table.shape == (256,)
    assert np.all(np.diff(table) > 0)  # sorted and no duplicates
    assert table.min() > -1.0 and table.max() == 1.0
    assert 0.0 in table
    # Smallest magnitude level is about 1e-6 * 0.55 (exponent 0).
    assert np.abs(table[table != 0]).min() == pytest.approx(5.5e-7, rel=1e-6)


def test_dynamic_map_is_cached_and_read_only():
    assert dynamic_map() is dynamic_map()
    with pytest.raises(ValueError, match="read-only"):
        dynamic_map()[0] = 0.0


def test_nf4_code_equals_bitsandbytes(bnb):
    theirs = bnb.functional.get_4bit_type("nf4", device="cpu").numpy()
    assert theirs.dtype == np.float32
    np.testing.assert_array_equal(NF4_CODE, theirs)


def test_dynamic_map_equals_bitsandbytes_exactly(bnb):
    theirs = bnb.functional.create_dynamic_map().numpy()
    assert theirs.dtype == np.float32
    # Bit-exact, not allclose: one ulp changes which code a scale rounds to.
    np.testing.assert_array_equal(dynamic_map(), theirs)
