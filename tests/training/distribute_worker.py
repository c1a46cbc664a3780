"""Subprocess body of test_distribute.py (logical devices must be set before
TensorFlow initializes, and multi-worker runs need separate processes).

Usage: python distribute_worker.py MODE OUT_JSON
MODE: single | mirrored | offload_devices | offload_mirrored | multiworker
(multiworker reads TF_CONFIG). Writes a JSON result to OUT_JSON.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

MODE, OUT = sys.argv[1], sys.argv[2]

if MODE != "multiworker":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )

import keras  # noqa: E402

import keras_qlora  # noqa: E402

GLOBAL_BATCH = 32


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 24)).astype("float32")
    y = np.tanh(x @ rng.standard_normal((24, 8)).astype("float32"))
    return x, y


def dataset():
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return ds.with_options(options)


def build(**kwargs):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((24,)),
            keras.layers.Dense(64, activation="gelu", name="query"),
            keras.layers.Dense(64, activation="gelu", name="mlp"),
            keras.layers.Dense(8, name="value"),
        ]
    )
    q = keras_qlora.apply(model, rank=4, verbose=False, **kwargs)
    q.compile(optimizer=keras.optimizers.AdamW(5e-3), loss="mse")
    return q


def train(q):
    hist = q.fit(dataset(), epochs=4, verbose=0)
    return {
        "loss": [float(v) for v in hist.history["loss"]],
        "lora": {
            v.path: np.asarray(v.numpy()).tolist() for v in q.trainable_variables
        },
    }


def main():
    result = {}
    if MODE == "single":
        result = train(build())
    elif MODE == "mirrored":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            q = build()
        result = train(q)
        result["replicas"] = strategy.num_replicas_in_sync
        result["variable_type"] = type(q.trainable_variables[0].value).__name__
    elif MODE == "offload_devices":
        # Model variables on /CPU:1 (the "accelerator"), state on /CPU:0.
        with tf.device("/CPU:1"):
            q = build(offload_optimizer=True)
            result = train(q)
        result["model_devices"] = sorted(
            {v.value.device for v in q.trainable_variables}
        )
        # The moments (the scalars iterations / learning_rate live where
        # the inner optimizer was constructed).
        result["slot_devices"] = sorted(
            {
                v.value.device
                for v in q.optimizer.host_variables()
                if "lora" in v.path
            }
        )
        result["num_slots"] = sum(
            "lora" in v.path for v in q.optimizer.host_variables()
        )
    elif MODE == "offload_mirrored":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        try:
            with strategy.scope():
                q = build(offload_optimizer=True)
            train(q)
            result["error"] = None
        except ValueError as err:
            result["error"] = str(err)
    elif MODE == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        with strategy.scope():
            q = build()
        result = train(q)
        result["replicas"] = strategy.num_replicas_in_sync
        result["task"] = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    else:
        raise SystemExit(f"unknown mode {MODE}")
    with open(OUT, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
