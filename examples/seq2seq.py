"""QLoRA on a small BART encoder-decoder that learns to reverse digits.

A keras_hub `BartBackbone` (small config, random init: no pretrained
weights can be downloaded here) inside `keras_hub.models.BartSeq2SeqLM`
learns a toy task made by this script: reverse a string of 3-8 random
digits ("30517" -> "71503"). Test strings never occur in training.

`keras_qlora.apply(lm, target_modules="all-linear")` stores all 32 Dense /
EinsumDense layers of encoder and decoder (self- and cross-attention, MLPs)
as frozen NF4 with a LoRA adapter each. Greedy `generate()` output and the
exact-match accuracy are printed before and after training.

A pretrained model only needs small adapters; this one starts from random
weights, so it has nothing to adapt, and three choices (explained where
they are made) let it learn the task anyway: the rank equals the hidden
size, the embeddings and LayerNorms train as `modules_to_save`, and the
biases train (`bias="all"`).

Run (about 1-2 minutes on 2 CPU cores, no network):

    pip install -e .
    python examples/seq2seq.py            # --quick: a 30 s smoke run
"""

import argparse
import time

START = time.perf_counter()

DIGITS = "0123456789"
HIDDEN = 64
LAYERS = 2  # encoder layers, and as many decoder layers


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="QLoRA on a small random-init BART (keras_hub) that "
        "learns to reverse digit strings; generate() before and after."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny data, 1 layer, 1 epoch (a smoke test, about 30 s)",
    )
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument(
        "--rank",
        type=int,
        default=HIDDEN,
        help=f"LoRA rank (default {HIDDEN}, the hidden size)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=2e-3,
        help="peak Adam learning rate (linear warmup, cosine decay)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    defaults = (256, 16, 1) if args.quick else (4000, 200, 8)
    for name, value in zip(
        ("train_size", "test_size", "epochs"), defaults, strict=True
    ):
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("train_size", "test_size", "epochs", "rank", "batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.train_size < args.batch_size:
        parser.error("--train-size must be at least --batch-size")
    return args


def make_task(seed, train_size, test_size, min_len=3, max_len=8):
    """Random digit strings and their reversals; no test string is a
    training string.

    Returns:
        `((train_sources, train_targets), (test_sources, test_targets))`.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    seen, sources = set(), []
    while len(sources) < train_size + test_size:
        length = int(rng.integers(min_len, max_len + 1))
        text = "".join(rng.choice(list(DIGITS), size=length))
        if text not in seen:  # 3-digit strings repeat otherwise
            seen.add(text)
            sources.append(text)
    targets = [s[::-1] for s in sources]
    cut = train_size
    return (sources[:cut], targets[:cut]), (sources[cut:], targets[cut:])


def build_model(quick, seq_len):
    """The random-init BART task with a digit tokenizer attached."""
    import keras_hub

    specials = ["<s>", "<pad>", "</s>", "<mask>"]
    # One token per digit. keras_hub's BPE tokenizer cannot be built with
    # no merge rule at all, so it gets one that digits never trigger.
    tokens = specials + list(DIGITS) + ["Ġ", "ĠĠ"]
    tokenizer = keras_hub.models.BartTokenizer(
        vocabulary={t: i for i, t in enumerate(tokens)}, merges=["Ġ Ġ"]
    )
    backbone = keras_hub.models.BartBackbone(
        vocabulary_size=len(tokens),
        num_layers=1 if quick else LAYERS,
        num_heads=2,
        hidden_dim=HIDDEN,
        intermediate_dim=4 * HIDDEN,
        dropout=0.0,
        max_sequence_length=2 * seq_len,
    )
    preprocessor = keras_hub.models.BartSeq2SeqLMPreprocessor(
        tokenizer=tokenizer,
        encoder_sequence_length=seq_len,
        decoder_sequence_length=seq_len,
    )
    lm = keras_hub.models.BartSeq2SeqLM(
        backbone=backbone, preprocessor=preprocessor
    )
    lm.compile(sampler="greedy")
    return lm


def trainable_float(path, layer):
    """`modules_to_save` selector: embeddings and LayerNorms.

    Random embeddings carry no meaning yet, and the tied token embedding
    is also the output layer. Freezing the post-LN LayerNorms at their
    initial scale kept the adapters stuck at a constant output in our
    runs (the same model trained fully in float learned the task).
    """
    import keras
    import keras_hub

    kinds = (
        keras.layers.LayerNormalization,
        keras_hub.layers.PositionEmbedding,
        keras_hub.layers.ReversibleEmbedding,
    )
    return isinstance(layer, kinds)


def apply_qlora(lm, rank):
    """NF4 + LoRA on every linear layer, embeddings / LayerNorms float."""
    import keras_qlora

    model = keras_qlora.apply(
        lm,
        # rank = hidden size: with nothing pretrained to adapt, the
        # adapters must be able to express any update of a square layer.
        rank=rank,
        alpha=rank,
        target_modules="all-linear",
        modules_to_save=trainable_float,
        bias="all",
    )
    keras_qlora.summary(model)
    # apply() swapped layers inside the task: compile it again, which drops
    # any generate() function traced on the float layers (and, on a GPU,
    # turns XLA off: the NF4 op cannot be XLA-compiled).
    lm.compile(sampler="greedy")
    return model


def evaluate(lm, sources, targets, title, max_length):
    """Greedy `generate()` on all sources; prints examples, returns the
    exact-match accuracy."""
    outputs = [s.strip() for s in lm.generate(sources, max_length=max_length)]
    hits = [o == t for o, t in zip(outputs, targets, strict=True)]
    accuracy = sum(hits) / len(hits)
    print(f"\n--- generate() {title}: exact match {accuracy:.3f} ---")
    for source, target, output in list(
        zip(sources, targets, outputs, strict=True)
    )[:5]:
        mark = "ok" if output == target else "wrong"
        print(f"{source:>8} -> {output!r:12} (want {target!r}, {mark})")
    return accuracy


def optimizer(learning_rate, steps):
    """Adam, warmup over the first 10% of steps then cosine decay, with
    clipped gradients: steadier when training from random init."""
    import keras

    warmup = max(1, steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        max(1, steps - warmup),
        warmup_target=learning_rate,
        warmup_steps=warmup,
    )
    return keras.optimizers.Adam(schedule, clipnorm=1.0)


def main(argv=None):
    args = parse_args(argv)
    import keras
    import numpy as np

    keras.utils.set_random_seed(args.seed)
    (train_x, train_y), (test_x, test_y) = make_task(
        args.seed, args.train_size, args.test_size
    )
    print(
        f"Task: reverse 3-8 digits, {len(train_x)} train / {len(test_x)} "
        f"test strings (disjoint), e.g. {train_x[0]!r} -> {train_y[0]!r}"
    )
    seq_len = 8 + 2  # digits + start / end tokens
    lm = build_model(args.quick, seq_len)
    acc_before = evaluate(
        lm, test_x, test_y, "before QLoRA (random float model)", seq_len
    )

    start = time.perf_counter()
    model = apply_qlora(lm, args.rank)
    quantize_s = time.perf_counter() - start

    x, y, weights = lm.preprocessor(
        {"encoder_text": train_x, "decoder_text": train_y}
    )
    x = {k: np.asarray(v) for k, v in x.items()}
    steps = args.epochs * (len(train_x) // args.batch_size)
    model.compile(
        optimizer=optimizer(args.learning_rate, steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    start = time.perf_counter()
    history = model.fit(
        x,
        np.asarray(y),
        sample_weight=np.asarray(weights, dtype="float32"),
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=1,
    )
    train_s = time.perf_counter() - start
    acc_after = evaluate(
        model.base_model, test_x, test_y, "after QLoRA training", seq_len
    )

    layers = 1 if args.quick else LAYERS
    print("\n==== QLoRA seq2seq report ====")
    print(
        f"model               BART, {layers}+{layers} layers, hidden "
        f"{HIDDEN}, random init"
    )
    print(f"LoRA                r={args.rank} on all linear layers")
    print(
        f"train               {len(train_x)} strings, {args.epochs} "
        f"epoch(s), batch {args.batch_size}"
    )
    print(f"final loss          {history.history['loss'][-1]:.4f}")
    print(
        f"exact match         {acc_before:.3f} before -> {acc_after:.3f} "
        f"after ({len(test_x)} test strings)"
    )
    print(f"quantize time       {quantize_s:.1f} s")
    print(f"train time          {train_s:.1f} s")
    print(f"total wall time     {time.perf_counter() - START:.1f} s")


if __name__ == "__main__":
    main()
