"""A checksum of a QLoRA layer's NF4 state, saved with it in `.keras` files.

NaN/Inf in a saved float weight are caught by their values; a corrupted NF4
byte is not (every byte is a valid pair of codes), so a model whose packed
weights were overwritten would load and compute garbage without a word. Each
layer saves a sha256 over its NF4 arrays (`nf4_sha256`, 32 bytes) and
checks it on load. Files written before the checksum existed have no such
entry and load unchecked.
"""

import hashlib

import numpy as np

KEY = "nf4_sha256"
NAMES = ("nf4_packed", "nf4_absmax", "nf4_absmax_scale", "nf4_absmax_offset")


def digest(values: dict) -> np.ndarray:
    """sha256 (32 uint8) over the NF4 arrays of `values` ({name: array})."""
    h = hashlib.sha256()
    for name in NAMES:
        if name in values:
            array = np.ascontiguousarray(values[name])
            h.update(f"{name}{array.dtype.str}{array.shape}".encode())
            h.update(array.tobytes())
    return np.frombuffer(h.digest(), np.uint8).copy()


def check(layer_name: str, store, keys) -> None:
    """Raises ValueError when the saved checksum disagrees with the saved
    NF4 arrays; a store without a checksum passes."""
    if KEY not in keys:
        return
    saved = np.asarray(store[KEY])
    values = {n: np.asarray(store[n]) for n in NAMES if n in keys}
    if saved.shape != (32,) or not np.array_equal(saved, digest(values)):
        raise ValueError(
            f"Layer '{layer_name}': its saved NF4 weights "
            f"({', '.join(sorted(values))}) do not match the checksum saved "
            "with them; the file is corrupt. Save the model again from a "
            "good copy."
        )
