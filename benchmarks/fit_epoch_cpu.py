"""Seconds per `fit` epoch: keras_qlora vs Keras float32 + `enable_lora`.

The model, data, batch and sequence length are those of the main example
(`examples/finetune_classifier.py`, imported from there): the pretrained
all-MiniLM-L6-v2 backbone -> masked mean pooling -> Dense(2), trained on the
Rotten Tomatoes snippets, batch 32, sequence length 48, Adam 2e-3.

- qlora: `keras_qlora.apply(classifier, rank=8, alpha=16,
  modules_to_save=["classifier_head"])`, as the example: all 37 linear
  layers NF4, LoRA on query / key / value, the head float and trainable;
- keras: the float32 classifier, every backbone variable frozen, Keras' own
  `enable_lora(8, lora_alpha=16)` on the same layers (same paths), the head
  trainable.

Both models live in one process. The first `fit` epoch of each (the trace)
is not timed; then they train in turns, one `fit` epoch of each per round
(order alternating): "epoch s" is the median. Then they run single steps
interleaved (`model.train_function`, the step `fit` runs): "step ms" is the
median, "paired" the median over the pairs of (step / keras step), the
ratio least affected by the load drifts of a shared machine. Only ratios
mean anything here.

Run alone: python benchmarks/fit_epoch_cpu.py [--quick] [--extra ...]
or as part of `python benchmarks/matmul_cpu.py --section fit`.
"""

import argparse
import contextlib
import importlib.util
import os
import pathlib
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXAMPLE = (
    pathlib.Path(__file__).resolve().parent.parent
    / "examples"
    / "finetune_classifier.py"
)
RANK, ALPHA, LEARNING_RATE = 8, 16, 2e-3
FULL = {"train_size": 2000, "rounds": 3, "pairs": 30}
QUICK = {"train_size": 320, "rounds": 2, "pairs": 20}


def load_example():
    """The example script as a module (its helpers, not its main())."""
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def example_data(example, train_size, seq_len, seed=0):
    """The example's tokenized training set and its batches."""
    import keras_hub

    model_dir = example.package_dir(example.MODEL_PACKAGE) / "model"
    (texts, labels), _ = example.load_reviews(seed, train_size, 0)
    tokenizer = keras_hub.models.BertTokenizer.from_preset(str(model_dir))
    features = example.tokenize(tokenizer, texts, seq_len)
    return model_dir, features, labels


def compile_model(model):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def qlora_model(example, model_dir, **apply_kwargs):
    """The example's model: `apply()` as `example.make_model` calls it."""
    import keras_hub

    import keras_qlora

    backbone = keras_hub.models.BertBackbone.from_preset(str(model_dir))
    classifier = example.build_classifier(backbone)
    kwargs = dict(rank=RANK, alpha=ALPHA, modules_to_save=["classifier_head"])
    kwargs.update(apply_kwargs)
    model = keras_qlora.apply(classifier, verbose=False, **kwargs)
    return compile_model(model)


def keras_lora_model(example, model_dir, paths):
    """Float32 classifier; Keras `enable_lora` on the layers at `paths`."""
    import keras_hub

    from keras_qlora import surgery

    backbone = keras_hub.models.BertBackbone.from_preset(str(model_dir))
    classifier = example.build_classifier(backbone)
    for variable in backbone.weights:
        variable.trainable = False
    # Paths below the backbone (a second backbone gets another name).
    by_path = {e.path: e.layer for e in surgery.walk(backbone)}
    missing = sorted(set(paths) - set(by_path))
    if missing:
        raise SystemExit(f"Keras model lacks the LoRA targets {missing}")
    for path in paths:
        by_path[path].enable_lora(RANK, lora_alpha=ALPHA)
    return compile_model(classifier)


def compare(models, batches, rounds, pairs, traced_in=None):
    """Times each model's epochs (in turns) and steps (interleaved).

    Args:
        models: {name: compiled model}.
        batches: a `tf.data.Dataset` of (features, labels) batches.
        rounds: timed `fit` epochs per model, after an untimed first one
            (the trace).
        pairs: training steps per model run interleaved, step by step
            (`model.train_function` on its own repeating iterator), for
            paired ratios that the machine's load drifts affect least.
        traced_in: {name: a function returning the context the model's
            first epoch (its trace) runs in}.

    Returns:
        {name: {"warmup_s": float, "epoch_s": [...], "step_s": [...]}}.
    """
    import numpy as np

    names = list(models)
    results = {name: {"epoch_s": [], "step_s": []} for name in names}
    for name in names:
        context = (traced_in or {}).get(name, contextlib.nullcontext)
        start = time.perf_counter()
        with context():
            models[name].fit(batches, epochs=1, verbose=0, shuffle=False)
        results[name]["warmup_s"] = time.perf_counter() - start
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            models[name].fit(batches, epochs=1, verbose=0, shuffle=False)
            results[name]["epoch_s"].append(time.perf_counter() - start)
    iterators = {name: iter(batches.repeat()) for name in names}
    for i in range(pairs):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            logs = models[name].train_function(iterators[name])
            if hasattr(logs, "get_value"):
                logs = logs.get_value()
            np.asarray(logs["loss"])  # waits for the step
            results[name]["step_s"].append(time.perf_counter() - start)
    return results


def print_table(results, base="keras", steps_per_epoch=None):
    """Median epoch / step times and ratios against `base`."""
    med = {
        name: (
            statistics.median(r["epoch_s"]),
            statistics.median(r["step_s"]),
        )
        for name, r in results.items()
    }
    print(
        f"{'config':>12} {'warm-up s':>10} {'epoch s':>8} {'step ms':>8} "
        f"{'epoch/' + base:>12} {'step/' + base:>11} {'paired':>7}  "
        "epochs (s)"
    )
    for name, r in results.items():
        epoch, step = med[name]
        paired = statistics.median(
            a / b
            for a, b in zip(r["step_s"], results[base]["step_s"], strict=True)
        )
        print(
            f"{name:>12} {r['warmup_s']:>10.1f} {epoch:>8.2f} "
            f"{1e3 * step:>8.1f} {epoch / med[base][0]:>12.3f} "
            f"{step / med[base][1]:>11.3f} {paired:>7.3f}  "
            + " ".join(f"{e:.2f}" for e in r["epoch_s"]),
            flush=True,
        )
    print(
        f"epoch: median fit() epoch ({steps_per_epoch} steps, first epoch "
        "excluded); step: median of the interleaved steps; paired: median "
        f"of step/{base} over the pairs of interleaved steps"
    )


def run(quick=False, rounds=None, train_size=None, extra=(), pairs=None):
    """The whole comparison; prints the table.

    Args:
        quick: a smaller training set (10 steps per epoch).
        rounds: timed epochs per model (default 3, quick 2).
        pairs: interleaved timed steps per model (default 30, quick 20).
        train_size: training snippets (default 2000, quick 320).
        extra: names of extra keras_qlora configs to add (see `EXTRA`).
    """
    import keras
    import tensorflow as tf

    import keras_qlora  # noqa: F401 (sets the allocator before TF allocates)

    settings = dict(QUICK if quick else FULL)
    if rounds is not None:
        settings["rounds"] = rounds
    if pairs is not None:
        settings["pairs"] = pairs
    if train_size:
        settings["train_size"] = train_size
    example = load_example()
    defaults = example.DEFAULTS
    seq_len, batch_size = defaults["seq_len"], 32
    keras.utils.set_random_seed(0)
    model_dir, features, labels = example_data(
        example, settings["train_size"], seq_len
    )
    batches = example.training_batches(features, labels, batch_size, seed=0)
    models = {"qlora": qlora_model(example, model_dir)}
    traced_in = {}
    paths = sorted(
        path.split("/", 1)[1]
        for path in models["qlora"].qlora_layers(lora_only=True)
    )
    for name in extra:
        kwargs, context = EXTRA[name]
        models[name] = qlora_model(example, model_dir, **kwargs)
        if context is not None:
            traced_in[name] = context
    models["keras"] = keras_lora_model(example, model_dir, paths)
    trainable = {
        name: sum(int(tf.size(v)) for v in m.trainable_variables)
        for name, m in models.items()
    }
    steps = len(labels) // batch_size
    print(
        f"fit per epoch: all-MiniLM-L6-v2 classifier, {len(labels)} "
        f"snippets, batch {batch_size}, seq_len {seq_len} "
        f"(M = {batch_size * seq_len} rows per linear layer), LoRA r={RANK} "
        f"alpha={ALPHA} on {len(paths)} layers (query/key/value); trainable "
        + ", ".join(f"{n} {c:,}" for n, c in trainable.items())
    )
    results = compare(
        models, batches, settings["rounds"], settings["pairs"], traced_in
    )
    print_table(results, steps_per_epoch=steps)
    return results


def _pure_path():
    """Traces on the package's pure-TF path (as `KERAS_QLORA_PURE_TF=1`)."""
    from unittest import mock

    from keras_qlora.ops import fused

    return mock.patch.object(fused, "fused_library", lambda: None)


def _float_op():
    """Traces with `tf.matmul` on the dequantized float32 kernel in place
    of the NF4 op (input gradient only, as the op): a diagnostic, the rest
    of keras_qlora's step with a matmul at oneDNN float32 speed."""
    from unittest import mock

    import tensorflow as tf

    import keras_qlora.ops as qops
    from keras_qlora.ops.reference import dequantize_transposed

    kernels = {}

    def float_matmul(x, weight, transpose=False):
        key = id(weight.packed)
        if key not in kernels:
            with tf.init_scope():
                w_t = dequantize_transposed(
                    *weight.arrays(), weight.shape, weight.block_size
                )
                kernels[key] = tf.constant(tf.transpose(w_t))  # (K, N)
        return tf.matmul(x, kernels[key], transpose_b=transpose)

    return mock.patch.object(qops, "nf4_matmul", float_matmul)


# Extra keras_qlora configs for investigation (`--extra`): apply() kwargs
# and a context the first epoch (the trace) runs in.
EXTRA = {
    "qlora_pure": ({}, _pure_path),
    "qlora_f32op": ({}, _float_op),
    "qlora_remat": ({"gradient_checkpointing": True}, None),
    "qlora_8bit": ({"optimizer_8bit": True}, None),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 steps/epoch")
    parser.add_argument("--rounds", type=int, help="timed epochs per model")
    parser.add_argument(
        "--pairs", type=int, help="interleaved timed steps per model"
    )
    parser.add_argument("--train-size", type=int, help="training snippets")
    parser.add_argument(
        "--extra",
        default="",
        help=f"comma-separated extra configs: {', '.join(EXTRA)}",
    )
    args = parser.parse_args()
    extra = [e for e in args.extra.split(",") if e]
    unknown = sorted(set(extra) - set(EXTRA))
    if unknown:
        parser.error(f"unknown --extra {unknown}; known: {sorted(EXTRA)}")
    run(args.quick, args.rounds, args.train_size, extra, args.pairs)


if __name__ == "__main__":
    main()
