"""`NF4State`: the packed 4-bit weight and its quantization metadata.

One object carries everything needed to dequantize a kernel; it round-trips
to a plain dict of numpy arrays and Python scalars (`to_dict` / `from_dict`).
"""

import dataclasses
from typing import Any

import numpy as np

from keras_qlora.quantizers import codes

ALLOWED_BLOCK_SIZES = (32, 64, 128, 256)
# The base formats of a frozen weight: NormalFloat-4 and bitsandbytes' FP4
# (4-bit codes in blocks), and int8 with one absmax scale per output
# (bitsandbytes' LLM.int8() weight, `Int8Params`).
QUANT_TYPES = ("nf4", "fp4", "int8")
# Double quantization quantizes the per-block absmax values in blocks of 256.
NESTED_BLOCK_SIZE = 256


def check_block_size(block_size: Any, name: str = "block_size") -> int:
    """Returns `block_size` as an int, the one check of an NF4 block size.

    Raises:
        TypeError: not an int.
        ValueError: not one of `ALLOWED_BLOCK_SIZES`.
    """
    allowed = f"{name} must be one of {ALLOWED_BLOCK_SIZES}. "
    if isinstance(block_size, bool) or not isinstance(
        block_size, (int, np.integer)
    ):
        raise TypeError(f"{allowed}Received: {name}={block_size!r}")
    if int(block_size) not in ALLOWED_BLOCK_SIZES:
        raise ValueError(f"{allowed}Received: {name}={block_size!r}")
    return int(block_size)


def check_quant_type(quant_type: Any, name: str = "quant_type") -> str:
    """Returns `quant_type`, the one check of a base format's name.

    Raises:
        TypeError: not a string.
        ValueError: not one of `QUANT_TYPES`.

    Example:
    >>> check_quant_type("int8")
    'int8'
    """
    allowed = f"{name} must be one of {QUANT_TYPES}. "
    if not isinstance(quant_type, str):
        raise TypeError(f"{allowed}Received: {name}={quant_type!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{allowed}Received: {name}={quant_type!r}")
    return quant_type


def check_flag(value: Any, name: str) -> bool:
    """Returns `value` as a bool, the check of a quantizer's on/off option.

    Raises:
        TypeError: not True or False (a string such as "no" is truthy, so
            it would silently turn the option on).
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"{name} must be a bool (True or False). Received: {name}={value!r}"
        )
    return bool(value)


def packed_bytes(num_elements: int, quant_type: str = "nf4") -> int:
    """Bytes of `packed` for `num_elements` weights: two 4-bit codes per
    byte (the last one padded), or one int8 code per byte."""
    if quant_type == "int8":
        return num_elements
    return (num_elements + 1) // 2


def num_blocks(num_elements: int, block_size: int) -> int:
    """Number of quantization blocks (the last one may be partial)."""
    return -(-num_elements // block_size)


@dataclasses.dataclass(frozen=True, eq=False)
class NF4State:
    """A quantized kernel: NF4 (the default), FP4 or int8.

    The logical kernel is the Keras layout `[K, N]` (inputs, outputs). The
    bytes follow bitsandbytes: the transposed matrix `[N, K]` is flattened
    row-major. For "nf4" and "fp4" it is cut into blocks of `block_size`
    and each element is stored as a 4-bit index into the format's table
    (`codes.NF4_CODE`, `codes.FP4_CODE`), two per byte, first element in
    the high nibble. For "int8" each element is one signed byte (stored as
    its uint8 bit pattern) and each row of `[N, K]` (one output) has one
    float32 scale, its absmax: a block is a row, so `block_size == K`.

    Attributes:
        packed: uint8 array of `ceil(K * N / 2)` bytes (4-bit formats) or
            `K * N` bytes (int8).
        absmax: per-block scales. float32 when `double_quant` is off; uint8
            codes into `codes.dynamic_map()` when it is on. int8: float32
            `[N]` (bitsandbytes' `SCB`).
        shape: the logical kernel shape `(K, N)`.
        block_size: elements per block, one of 32, 64, 128, 256; K for
            int8.
        absmax_scale: float32 scale per 256 blocks (double quant only).
        absmax_offset: float32 offset added back to every block scale
            (double quant only).
        quant_type: the base format, one of `QUANT_TYPES`.
    """

    packed: np.ndarray
    absmax: np.ndarray
    shape: tuple
    block_size: int = 64
    absmax_scale: np.ndarray | None = None
    absmax_offset: float | None = None
    quant_type: str = "nf4"

    def __post_init__(self):
        shape = _check_shape(self.shape)
        object.__setattr__(self, "shape", shape)
        quant_type = check_quant_type(self.quant_type, "NF4State quant_type")
        if quant_type == "int8":
            self._check_int8(shape)
            return
        block_size = check_block_size(self.block_size)
        n = shape[0] * shape[1]
        blocks = num_blocks(n, block_size)
        _check_array("packed", self.packed, np.uint8, (packed_bytes(n),))
        if (self.absmax_scale is None) != (self.absmax_offset is None):
            raise ValueError(
                "NF4State needs both absmax_scale and absmax_offset for "
                "double quantization, or neither. Received: "
                f"absmax_scale={_describe(self.absmax_scale)}, "
                f"absmax_offset={self.absmax_offset!r}"
            )
        if self.absmax_scale is None:
            _check_array("absmax", self.absmax, np.float32, (blocks,))
            _check_finite("absmax", self.absmax)
        else:
            _check_array("absmax", self.absmax, np.uint8, (blocks,))
            nested = num_blocks(blocks, NESTED_BLOCK_SIZE)
            _check_array(
                "absmax_scale", self.absmax_scale, np.float32, (nested,)
            )
            _check_finite("absmax_scale", self.absmax_scale)
            offset = self.absmax_offset
            if isinstance(offset, bool) or not isinstance(
                offset, (int, float, np.integer, np.floating)
            ):
                raise TypeError(
                    "NF4State absmax_offset must be a number. Received: "
                    f"absmax_offset={offset!r}"
                )
            # Checked after the cast to float32: 1e39 is finite in Python.
            with np.errstate(over="ignore"):
                offset = np.float32(offset)
            _check_finite("absmax_offset", offset)
            object.__setattr__(self, "absmax_offset", float(offset))

    def _check_int8(self, shape):
        k, n = shape
        if isinstance(self.block_size, bool) or self.block_size != k:
            raise ValueError(
                "NF4State with quant_type='int8' has one scale per output "
                f"(a block is a row of K={k}), so block_size must be {k}. "
                f"Received: block_size={self.block_size!r}"
            )
        object.__setattr__(self, "block_size", k)
        if self.absmax_scale is not None or self.absmax_offset is not None:
            raise ValueError(
                "NF4State with quant_type='int8' has no double quantization: "
                "absmax_scale and absmax_offset must be None. Received: "
                f"absmax_scale={_describe(self.absmax_scale)}, "
                f"absmax_offset={self.absmax_offset!r}"
            )
        _check_array(
            "packed", self.packed, np.uint8, (packed_bytes(k * n, "int8"),)
        )
        _check_array("absmax", self.absmax, np.float32, (n,))
        _check_finite("absmax", self.absmax)

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def num_elements(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.num_elements, self.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed indices plus all scale metadata."""
        total = self.packed.nbytes + self.absmax.nbytes
        if self.double_quant:
            total += self.absmax_scale.nbytes + 4
        return total

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.num_elements

    def block_absmax(self) -> np.ndarray:
        """The float32 scale of every block, after undoing double quant."""
        if not self.double_quant:
            return self.absmax
        return dequantize_absmax(
            self.absmax, self.absmax_scale, self.absmax_offset
        )

    def to_dict(self) -> dict:
        """Returns the state as numpy arrays and Python scalars."""
        out = {
            "packed": self.packed,
            "absmax": self.absmax,
            "shape": list(self.shape),
            "block_size": self.block_size,
        }
        if self.double_quant:
            out["absmax_scale"] = self.absmax_scale
            out["absmax_offset"] = self.absmax_offset
        if self.quant_type != "nf4":
            out["quant_type"] = self.quant_type
        return out

    @classmethod
    def from_dict(cls, config: dict) -> "NF4State":
        """Rebuilds a state from `to_dict()` output; validates every field."""
        if not isinstance(config, dict):
            raise TypeError(
                f"NF4State.from_dict expects a dict. Received: {type(config)}"
            )
        missing = {"packed", "absmax", "shape"} - set(config)
        if missing:
            raise ValueError(
                f"NF4State.from_dict is missing keys {sorted(missing)}. "
                f"Received keys: {sorted(config)}"
            )
        return cls(
            packed=np.asarray(config["packed"]),
            absmax=np.asarray(config["absmax"]),
            shape=tuple(config["shape"]),
            block_size=config.get("block_size", 64),
            absmax_scale=(
                None
                if config.get("absmax_scale") is None
                else np.asarray(config["absmax_scale"])
            ),
            absmax_offset=config.get("absmax_offset"),
            quant_type=config.get("quant_type", "nf4"),
        )


def dequantize_absmax(
    codes_u8: np.ndarray, scale: np.ndarray, offset: float
) -> np.ndarray:
    """Undoes double quantization: `code2[q] * scale[i // 256] + offset`."""
    table = codes.dynamic_map()
    per_block = np.repeat(scale, NESTED_BLOCK_SIZE)[: codes_u8.shape[0]]
    return (table[codes_u8] * per_block + np.float32(offset)).astype(np.float32)


def _check_shape(shape) -> tuple:
    """`shape` as two Python ints; a size must be an integer (64.5 was
    truncated to 64 before), and both positive."""
    try:
        sizes = tuple(shape)
    except TypeError:
        sizes = None
    if sizes is None or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool)
        for d in sizes
    ):
        raise TypeError(
            f"NF4State shape must be two ints (K, N). Received: shape={shape!r}"
        )
    sizes = tuple(int(d) for d in sizes)
    if len(sizes) != 2 or min(sizes) <= 0:
        raise ValueError(
            "NF4State shape must be two positive sizes (K, N). "
            f"Received: shape={shape!r}"
        )
    return sizes


def _check_finite(name, value):
    bad = int(np.size(value) - np.isfinite(value).sum())
    if bad:
        raise ValueError(
            f"NF4State {name} holds {bad} NaN or Inf value(s) (as float32); "
            "every block scale must be finite."
        )


def _describe(value) -> str:
    if value is None:
        return "None"
    arr = np.asarray(value)
    return f"array(shape={arr.shape}, dtype={arr.dtype})"


def _check_array(name, value, dtype, shape):
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"NF4State.{name} must be a numpy array. Received: {type(value)}"
        )
    if value.dtype != dtype or value.shape != shape:
        raise ValueError(
            f"NF4State.{name} must have dtype {np.dtype(dtype).name} and "
            f"shape {shape}. Received: {_describe(value)}"
        )
