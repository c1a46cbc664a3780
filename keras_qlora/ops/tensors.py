"""`NF4Tensors`: the 4-bit (or int8) weight as the op wrapper takes it, in
one object.

The tensor twin of `keras_qlora.quantizers.NF4State`: the same fields, but
the arrays may be TF / Keras tensors or variables (a layer passes its
variables), and nothing is validated here beyond what the op checks.
"""

import dataclasses
from typing import Any

import numpy as np

from keras_qlora.quantizers import NF4State


@dataclasses.dataclass(frozen=True, eq=False)
class NF4Tensors:
    """The 4-bit weight `W` (logical shape `[K, N]`) of `nf4_matmul`.

    Attributes:
        packed: uint8 packed 4-bit indices, `ceil(K * N / 2)` bytes.
        absmax: float32 block scales, or uint8 codes with double quant.
        absmax_scale: float32 per-256-block scales (double quant) or None.
        absmax_offset: float32 scalar offset (double quant) or None.
        shape: logical kernel shape `(K, N)` (Python ints).
        block_size: quantization block size (Python int); K for int8.
        quant_type: the base format, "nf4", "fp4" or "int8" (see
            `keras_qlora.quantizers.NF4State`).

    Example:
    >>> import numpy as np
    >>> from keras_qlora.quantizers import quantize_nf4
    >>> state = quantize_nf4(np.ones((64, 8), "float32"))
    >>> NF4Tensors.from_state(state).shape
    (64, 8)
    """

    packed: Any
    absmax: Any
    absmax_scale: Any
    absmax_offset: Any
    shape: tuple
    block_size: int
    quant_type: str = "nf4"

    @classmethod
    def from_state(cls, state: NF4State) -> "NF4Tensors":
        """The numpy arrays of an `NF4State` (offset as a float32 scalar).

        Raises:
            TypeError: `state` is not an `NF4State` (e.g. its `to_dict()`:
                rebuild it with `NF4State.from_dict` first).
        """
        if not isinstance(state, NF4State):
            raise TypeError(
                "NF4Tensors.from_state expects an NF4State (for a dict, "
                "NF4State.from_dict(d) first). Received: state of type "
                f"{type(state).__name__}"
            )
        offset = state.absmax_offset
        return cls(
            packed=state.packed,
            absmax=state.absmax,
            absmax_scale=state.absmax_scale,
            absmax_offset=None if offset is None else np.float32(offset),
            shape=tuple(state.shape),
            block_size=int(state.block_size),
            quant_type=state.quant_type,
        )

    def arrays(self) -> tuple:
        """`(packed, absmax, absmax_scale, absmax_offset)`, the op's inputs."""
        return (self.packed, self.absmax, self.absmax_scale, self.absmax_offset)

    def replace_arrays(self, arrays) -> "NF4Tensors":
        """The same weight with `arrays()` replaced (e.g. converted)."""
        packed, absmax, absmax_scale, absmax_offset = arrays
        return dataclasses.replace(
            self,
            packed=packed,
            absmax=absmax,
            absmax_scale=absmax_scale,
            absmax_offset=absmax_offset,
        )
