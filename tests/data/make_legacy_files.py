"""Writes the legacy_gpt2/ test data: files of the pre-varpaths layout.

Run once with the package of commit 642f9e5 (the last one whose QLoRA
variables had bare paths such as `query/lora_a`) first on sys.path:

    mkdir /tmp/kq-642f9e5
    git archive 642f9e5 keras_qlora custom_ops | tar -x -C /tmp/kq-642f9e5
    PYTHONPATH=/tmp/kq-642f9e5 python tests/data/make_legacy_files.py \
        tests/data/legacy_gpt2

It saves a 2-block keras_hub GPT-2 backbone (random weights) after
`keras_qlora.apply(target_modules="all-linear")` with random LoRA weights
and a second adapter "extra", as
- `model.keras` (active adapter "default", "extra" held as well);
- `adapter_extra/`: `save_adapter(model, name="extra")`;
- `checkpoint/ckpt-000001`: `training.save_checkpoint` after one AdamW
  step on adapter "default";
- `expected.npz`: the inputs `x_*` and the backbone outputs with each
  adapter active (`out_default`, `out_extra`) and after the AdamW step
  (`out_trained`).
tests/rewrite/test_variable_paths.py checks that these still load.
"""

import os
import sys

import keras
import keras_hub
import numpy as np

import keras_qlora


def _model():
    keras.utils.set_random_seed(7)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )
    model = keras_qlora.apply(
        backbone, rank=2, target_modules="all-linear", verbose=False
    )
    rng = np.random.default_rng(7)
    keras_qlora.add_adapter(model, "extra")
    for layer in model.qlora_layers().values():
        for name in layer.adapter_names:
            for v in layer.adapter_variables(name):
                v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))
    return model


def main(out_dir):
    os.makedirs(out_dir)
    model = _model()
    x = {
        "token_ids": np.random.default_rng(1).integers(0, 64, (2, 8)),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    out = {}
    keras_qlora.set_adapter(model, "extra")
    out["out_extra"] = np.asarray(model(x))
    keras_qlora.save_adapter(model, os.path.join(out_dir, "adapter_extra"))
    keras_qlora.set_adapter(model, "default")
    out["out_default"] = np.asarray(model(x))
    model.save(os.path.join(out_dir, "model.keras"))
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="mse")
    model.fit(x, np.zeros_like(out["out_default"]), epochs=1, verbose=0)
    out["out_trained"] = np.asarray(model(x))
    keras_qlora.training.save_checkpoint(
        model, os.path.join(out_dir, "checkpoint"), epoch=1
    )
    np.savez(
        os.path.join(out_dir, "expected.npz"),
        x_token_ids=x["token_ids"],
        x_padding_mask=x["padding_mask"],
        **out,
    )


if __name__ == "__main__":
    main(sys.argv[1])
