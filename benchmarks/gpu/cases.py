"""The GPU harness's correctness cases and their quantized weights.

A case is the tuple (m, k, n, block, double quant, transpose, dtype, algo,
tf32, misaligned x, quant type); `block` is the state's block_size (K for
int8, whose "blocks" are the rows of W^T). harness.py runs them on a GPU,
or on the kernels' CPU simulator with `--simulate`; sim_check.py runs a few
of the same shape under sanitizers.
"""

import formats
import numpy as np
import torch
from nf4_abi import to_device

DTYPES = ("float32", "bfloat16", "float16")
ALGOS = ("auto", "reference", "gemv", "mma")
# nf4: odd K, partial blocks, K not a block multiple, > 256 blocks, both
# regimes at real sizes.
SHAPES = [
    (64, 64),
    (96, 40),
    (33, 17),
    (100, 30),
    (528, 17),
    (1024, 300),
    (4096, 48),
    (256, 200),
    (2048, 700),
    (4112, 64),
    (4096, 4096),
]
# The other formats: fp4 runs nf4's kernels with its own table (the same
# shape classes, fewer of each); int8 (K any length) runs the tensor-core
# kernel when K % 16 == 0 (64, 240, 1008, 4096) and the reference kernel
# otherwise (70, 300, 33), never GEMV.
FORMAT_SHAPES = {
    "fp4": [(64, 64), (96, 40), (33, 17), (1024, 300), (256, 200), (2048, 700)],
    "int8": [
        (70, 24),
        (300, 40),
        (33, 17),
        (64, 64),
        (240, 72),
        (1008, 130),
        (4096, 48),
    ],
}
ROWS = [1, 2, 3, 5, 8, 9, 16, 17, 33, 64, 65, 130, 512]
BLOCKS = [64, 32, 128, 256]


def _grid(quant_type, shapes, i0=0) -> list:
    """Every algo, dtype and product on each shape; M, the block size,
    double quant, TF32 and misalignment cycle with the case index."""
    cases, i = [], i0
    for k, n in shapes:
        for algo in ALGOS:
            for dtype in DTYPES:
                for transpose in (False, True):
                    m = ROWS[i % len(ROWS)]
                    if k * n >= 4096 * 4096 and algo == "reference":
                        m = min(m, 16)  # the simple kernel is slow
                    int8 = quant_type == "int8"
                    cases.append(
                        (
                            m,
                            k,
                            n,
                            k if int8 else BLOCKS[i % len(BLOCKS)],
                            not int8 and i % 3 != 2,
                            transpose,
                            dtype,
                            algo,
                            i % 2 == 0,
                            i % 17 == 5,
                            quant_type,
                        )
                    )
                    i += 1
    return cases


def correctness_cases(quick: bool) -> list:
    cases = _grid("nf4", SHAPES)
    # Both regimes at sizes that matter, and M = 0.
    for m in (1, 4, 16, 128, 512):
        for transpose in (False, True):
            cases.append(
                (m, 4096, 11008, 64, True, transpose, "bfloat16", "auto")
                + (True, False, "nf4")
            )
    cases.append(
        (0, 64, 64, 64, True, False, "float32", "auto", True, False, "nf4")
    )
    for quant_type, shapes in FORMAT_SHAPES.items():
        cases += _grid(quant_type, shapes, i0=len(cases))
    return cases[::4] if quick else cases


class StateCache:
    """Quantized random kernels, reused across cases (x is always fresh):
    (host state, its tensors on `device`, W [K, N] as float64 there)."""

    def __init__(self, quantizers, device):
        self.q = quantizers
        self.device = device
        self.cache = {}

    def get(self, k, n, block, dq, quant_type="nf4"):
        key = (k, n, block, dq, quant_type)
        if key not in self.cache:
            rng = np.random.default_rng(hash(key[:4]) % 2**32)
            kernel = rng.standard_normal((k, n)).astype(np.float32)
            state = formats.make_state(self.q, kernel, quant_type, block, dq)
            w = formats.dequantize(self.q, state)
            self.cache[key] = (
                state,
                to_device(state, self.device),
                torch.from_numpy(w).to(self.device).double(),
            )
        return self.cache[key]
