"""A fingerprint of a model's frozen NF4 weights.

An adapter only makes sense on the base weights it was trained on. The
fingerprint is a sha256 per QLoRA layer over its kernel shape, NF4 settings
and NF4 arrays (packed nibbles, block scales, double-quant scale and
offset), and a sha256 over those per-layer digests. Arrays up to
`FULL_LIMIT` bytes are hashed whole; larger ones through `SAMPLES` chunks of
`SAMPLE_BYTES` at evenly spaced offsets (read on the device, so a 7B model
is not copied to the host to be checked). Two different base models, or
the same model quantized with other settings, differ in nearly every
block, so a sample of that size tells them apart.
"""

import hashlib
import json

import numpy as np
from keras import ops

ALGORITHM = "sha256-nf4-v1"
FULL_LIMIT = 1 << 20
SAMPLES = 64
SAMPLE_BYTES = 4096
# Per-layer digests are stored shortened: 64 bits name a differing layer.
SHORT = 16

_NF4_VARIABLES = (
    "nf4_packed",
    "nf4_absmax",
    "nf4_absmax_scale",
    "nf4_absmax_offset",
)


def layer_digest(layer) -> str:
    """sha256 (hex) of one QLoRA layer's frozen NF4 state."""
    h = hashlib.sha256()
    meta = [list(layer.kernel_2d_shape), layer.block_size, layer.double_quant]
    if layer.quant_type != "nf4":  # NF4 digests stay as they were
        meta.append(layer.quant_type)
    h.update(json.dumps(meta).encode())
    for name in _NF4_VARIABLES:
        variable = getattr(layer, name, None)
        if variable is not None:
            h.update(name.encode())
            _hash_variable(h, variable)
    return h.hexdigest()


def fingerprint(layers: dict) -> dict:
    """The fingerprint of `{path: QLoRA layer}`.

    Returns:
        `{"algorithm", "sha256", "layers": {path: short digest}}`, the form
        stored in `adapter_config.json`.
    """
    digests = {path: layer_digest(layers[path]) for path in sorted(layers)}
    total = hashlib.sha256()
    for path, digest in digests.items():
        total.update(f"{path}\0{digest}\0".encode())
    return {
        "algorithm": ALGORITHM,
        "sha256": total.hexdigest(),
        "layers": {p: d[:SHORT] for p, d in digests.items()},
    }


def differing_layers(saved: dict, current: dict) -> list:
    """Paths whose per-layer digests differ (or exist on one side only)."""
    a, b = saved["layers"], current["layers"]
    return sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))


def _hash_variable(h, variable):
    dtype = np.dtype(variable.dtype)
    size = int(np.prod(variable.shape, dtype=np.int64))
    h.update(f"{dtype.str}{tuple(variable.shape)}".encode())
    if size * dtype.itemsize <= FULL_LIMIT:
        h.update(np.asarray(variable.numpy()).tobytes())
        return
    # Large NF4 arrays are 1-D; slice on the device, copy only the samples.
    chunk = max(1, SAMPLE_BYTES // dtype.itemsize)
    starts = np.linspace(0, size - chunk, SAMPLES).astype(np.int64)
    flat = ops.reshape(variable.value, (-1,))
    for start in starts:
        piece = ops.convert_to_numpy(flat[int(start) : int(start) + chunk])
        h.update(np.asarray(piece).tobytes())
