"""Code tables shared by the quantizers: NF4 and FP4 values, the 8-bit dynamic
maps, the int8 dequantization constant.

Both tables are bit-identical to the ones bitsandbytes uses, so that states we
write can be dequantized by bitsandbytes and vice versa.
"""

import dataclasses
import functools

import numpy as np

# The 16 NormalFloat-4 values (QLoRA, Dettmers et al. 2023): quantiles of a
# standard normal, rescaled to [-1, 1], with an exact zero. The literals are
# the float32 values bitsandbytes ships; index i is the 4-bit code i.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
NF4_CODE.setflags(write=False)

# Decision boundaries between neighbouring codes, computed in float32 exactly
# as bitsandbytes does, so that rounding matches element for element.
NF4_MIDPOINTS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(
    np.float32
)
NF4_MIDPOINTS.setflags(write=False)

# Index of the code 0.0: what padding nibbles and all-zero blocks hold.
NF4_ZERO_INDEX = 7


# bitsandbytes' FP4 values (`get_4bit_type("fp4")`): a sign bit (bit 3), two
# exponent bits and one mantissa bit, the magnitudes 0, 0.0625, 8, 12, 4, 6,
# 2, 3 divided by 12. Index i is the 4-bit code i; unlike NF4 the table is
# not sorted. Hex literals are the exact float32 values.
FP4_CODE = np.array(
    [
        float.fromhex(v)
        for v in (
            "0x0p+0", "0x1.555556p-8", "0x1.555556p-1", "0x1p+0",
            "0x1.555556p-2", "0x1p-1", "0x1.555556p-3", "0x1p-2",
            "0x0p+0", "-0x1.555556p-8", "-0x1.555556p-1", "-0x1p+0",
            "-0x1.555556p-2", "-0x1p-1", "-0x1.555556p-3", "-0x1p-2",
        )
    ],
    dtype=np.float32,
)  # fmt: skip
FP4_CODE.setflags(write=False)

# The FP4 codes in increasing order of value, as bitsandbytes sorts them
# (its argsort puts the zero code 0 before the zero code 8); rounding picks
# a position in this order, the code stored is the entry there.
FP4_ORDER = np.array(
    [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8
)
FP4_ORDER.setflags(write=False)


@dataclasses.dataclass(frozen=True)
class FourBitFormat:
    """A 4-bit code table and how values round to it.

    Attributes:
        name: "nf4" or "fp4".
        code: the 16 float32 values, index = the 4-bit code.
        order: codes in increasing order of value.
        midpoints: the 15 float32 decision boundaries between neighbours
            of the sorted table, `(a + b) / 2` in float32; a value equal to
            one rounds down (bitsandbytes' `bucketize`).
        zero_index: the code padding nibbles and all-zero blocks hold.
    """

    name: str
    code: np.ndarray
    order: np.ndarray
    midpoints: np.ndarray
    zero_index: int

    def nearest(self, scaled: np.ndarray) -> np.ndarray:
        """Code (uint8) of the table value nearest each of `scaled`."""
        return self.order[np.searchsorted(self.midpoints, scaled)]


def _format(name, code, order, zero_index) -> FourBitFormat:
    ordered = code[order]
    mids = ((ordered[:-1] + ordered[1:]) / np.float32(2)).astype(np.float32)
    mids.setflags(write=False)
    return FourBitFormat(name, code, order, mids, zero_index)


_IDENTITY = np.arange(16, dtype=np.uint8)
_IDENTITY.setflags(write=False)
FOUR_BIT_FORMATS = {
    "nf4": _format("nf4", NF4_CODE, _IDENTITY, NF4_ZERO_INDEX),
    "fp4": _format("fp4", FP4_CODE, FP4_ORDER, 0),
}

# float32(1 / 127) as bitsandbytes writes it: an int8 code dequantizes to
# (code * row_scale) * INT8_INV_MAX, two float32 multiplies.
INT8_INV_MAX = np.float32(7.874015718698502e-3)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """A float32 linspace with the same rounding as torch's CPU kernel.

    torch fills the first half forwards from `start` and the second half
    backwards from `end`, each element one fused multiply-add rounded once to
    float32. The float64 products of float32 operands are exact, so computing
    in float64 and rounding at the end reproduces it; numpy's own linspace
    differs in the last bit, which would change the dynamic map.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    forward = np.float64(start32) + step * idx
    backward = np.float64(end32) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, forward, backward).astype(np.float32)


@functools.cache
def _dynamic_map_table(signed: bool) -> np.ndarray:
    parts = []
    # 8-bit dynamic type: for exponent e = 0..6 the fraction gets evenly
    # spaced levels (midpoints of a linspace over [0.1, 1]) scaled by
    # 10**(e - 6); 2**e levels mirrored for negatives when signed, 2**(e+1)
    # positive levels when unsigned (the sign bit becomes a fraction bit);
    # plus 0 and 1. Both variants have exactly 256 entries.
    for e in range(7):
        levels = 2**e if signed else 2 ** (e + 1)
        bounds = _linspace_f32(0.1, 1.0, levels + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (e - 6))
        parts.append(means * scale)
        if signed:
            parts.append(means * -scale)
    parts.append(np.array([0.0, 1.0], dtype=np.float32))
    table = np.sort(np.concatenate(parts).astype(np.float32))
    table.setflags(write=False)
    return table


def _dynamic_map() -> np.ndarray:
    return _dynamic_map_table(True)


def dynamic_map() -> np.ndarray:
    """Returns the 256-entry signed dynamic 8-bit map used for double quant.

    Returns:
        A read-only sorted float32 array of 256 values in [-1, 1].
    """
    return _dynamic_map()


@functools.cache
def dynamic_map_midpoints() -> np.ndarray:
    table = _dynamic_map()
    mids = ((table[:-1] + table[1:]) / np.float32(2)).astype(np.float32)
    mids.setflags(write=False)
    return mids


def unsigned_dynamic_map() -> np.ndarray:
    """Returns the 256-entry unsigned dynamic 8-bit map.

    bitsandbytes' `create_dynamic_map(signed=False)`: the map its 8-bit
    optimizers use for non-negative state (Adam's second moment).

    Returns:
        A read-only sorted float32 array of 256 values in [0, 1].

    Example:
        >>> table = unsigned_dynamic_map()
        >>> float(table[0]), float(table[-1])
        (0.0, 1.0)
    """
    return _dynamic_map_table(False)


@functools.cache
def unsigned_dynamic_map_midpoints() -> np.ndarray:
    """Decision boundaries (255) between neighbouring unsigned map codes."""
    table = _dynamic_map_table(False)
    mids = ((table[:-1] + table[1:]) / np.float32(2)).astype(np.float32)
    mids.setflags(write=False)
    return mids
