"""Splitting and joining quantized states along the output axis (fused
modules), in any base format (an int8 block is a whole row, so every cut
between outputs is exact).

GPT-2's `c_attn` is one HF weight `[3 * hidden, hidden]` (torch layout) for
our three layers query, key and value. An `NF4State` stores the torch
layout `[N, K]` row-major, so the pieces of a fused weight are consecutive
runs of its elements: exact to cut or join when every cut falls on a block
boundary (`K * N_piece % block_size == 0`). With double quantization the
block scales are themselves quantized in groups of 256 blocks around one
offset; a cut must then also fall on a group boundary, and pieces joined
as double-quantized must share the offset. When they do not, `join`
expands the block scales to float32 (what bitsandbytes computes from them,
bit for bit): the dequantized weight stays exact, at 32 instead of 8 bits
per block scale.
"""

import numpy as np

from keras_qlora.quantizers.state import NESTED_BLOCK_SIZE
from keras_qlora.quantizers.state import NF4State
from keras_qlora.quantizers.state import packed_bytes


def split(state: NF4State, pieces: int, what: str) -> list:
    """Cuts `state` (`[K, N]`) into `pieces` states `[K, N / pieces]`.

    Args:
        state: the fused weight.
        pieces: how many equal output slices.
        what: the weight's name, for messages.

    Raises:
        ValueError: N is not divisible by `pieces`, or a cut does not fall
            on a block (or, double quantized, a 256-block group) boundary.
    """
    k, n = state.shape
    if n % pieces:
        raise ValueError(
            f"'{what}' has {n} outputs, not divisible into {pieces} equal "
            "pieces (query, key, value)."
        )
    n_piece = n // pieces
    size = k * n_piece
    _check_cut(size, state.block_size, what)
    blocks = size // state.block_size
    if state.double_quant and blocks % NESTED_BLOCK_SIZE:
        raise ValueError(
            f"'{what}' is double quantized in groups of {NESTED_BLOCK_SIZE} "
            f"blocks; each of its {pieces} pieces holds {blocks} blocks of "
            f"{state.block_size}, so the groups straddle pieces and cannot "
            "be cut exactly. apply() the model with double_quant=False to "
            "load it (the block scales are then expanded to float32, "
            "exactly)."
        )
    out = []
    for p in range(pieces):
        scale = None
        if state.double_quant:
            groups = blocks // NESTED_BLOCK_SIZE
            scale = state.absmax_scale[p * groups : (p + 1) * groups].copy()
        out.append(
            NF4State(
                # Cuts fall on (even) block boundaries: whole bytes.
                packed=state.packed[
                    packed_bytes(p * size, state.quant_type) : packed_bytes(
                        (p + 1) * size, state.quant_type
                    )
                ].copy(),
                absmax=state.absmax[p * blocks : (p + 1) * blocks].copy(),
                shape=(k, n_piece),
                block_size=state.block_size,
                absmax_scale=scale,
                absmax_offset=state.absmax_offset,
                quant_type=state.quant_type,
            )
        )
    return out


def join(states: list, what: str) -> NF4State:
    """Joins states `[K, N_i]` into one `[K, sum N_i]`, exactly.

    Double-quantized pieces stay double quantized when they share the
    offset and every piece but the last fills whole 256-block groups;
    otherwise the result has float32 block scales (see the module doc).

    Raises:
        ValueError: pieces with different K or block sizes, or a piece (but
            the last) that does not end on a block boundary.
    """
    first = states[0]
    k, block_size = first.shape[0], first.block_size
    for state in states[1:]:
        if (state.shape[0], state.block_size, state.quant_type) != (
            k,
            block_size,
            first.quant_type,
        ):
            raise ValueError(
                f"The pieces of '{what}' differ in inputs, block size or "
                "format: "
                f"{[(s.shape, s.block_size, s.quant_type) for s in states]}."
            )
    for state in states[:-1]:
        _check_cut(state.num_elements, block_size, what)
    n = sum(s.shape[1] for s in states)
    packed = np.concatenate([s.packed for s in states])
    nested = all(s.double_quant for s in states) and (
        len({s.absmax_offset for s in states}) == 1
        and all(s.num_blocks % NESTED_BLOCK_SIZE == 0 for s in states[:-1])
    )
    if nested:
        return NF4State(
            packed=packed,
            absmax=np.concatenate([s.absmax for s in states]),
            shape=(k, n),
            block_size=block_size,
            absmax_scale=np.concatenate([s.absmax_scale for s in states]),
            absmax_offset=first.absmax_offset,
            quant_type=first.quant_type,
        )
    return NF4State(
        packed=packed,
        absmax=np.concatenate([s.block_absmax() for s in states]),
        shape=(k, n),
        block_size=block_size,
        quant_type=first.quant_type,
    )


def expand_scales(state: NF4State) -> NF4State:
    """The same weight with float32 block scales (no double quant)."""
    if not state.double_quant:
        return state
    return NF4State(
        packed=state.packed,
        absmax=state.block_absmax(),
        shape=state.shape,
        block_size=state.block_size,
        quant_type=state.quant_type,
    )


def _check_cut(size, block_size, what):
    if size % block_size:
        raise ValueError(
            f"'{what}' cannot be cut or joined exactly: a piece holds {size} "
            f"weights, not a multiple of block_size={block_size}, so a "
            "quantization block would straddle two layers."
        )
