"""Long sequences: `fit` memory and time with and without chunking.

Writes a random-weight Llama checkpoint (bfloat16, Hugging Face layout;
benchmarks/_checkpoints.py), by default the Llama-3.2-1B shape (1.24 B
parameters: hidden 2048, 16 layers, 32 query / 8 key-value heads, MLP 8192,
a 128,256-token vocabulary, tied embeddings). Then, for each sequence
length and each mode, in a fresh subprocess (so peaks do not mix):

  `keras_qlora.from_preset(keras_hub.models.LlamaCausalLM, dir,
  dtype="bfloat16", model_kwargs={"preprocessor": None},
  target_modules="all-linear", rank=8, gradient_checkpointing=True,
  optimizer_8bit=True)`, plus, in the chunked mode,
  `attention_chunk_size=C, lm_loss_chunk_size=C`; compiled with
  AdamW(1e-4) (8-bit) and `SparseCategoricalCrossentropy(from_logits=True)`;
  `fit` on random tokens, batch 1: --warmup steps (tracing included), then
  --steps timed steps.

The parent samples the child's RSS (/proc/<pid>/statm, every 10 ms) and
keeps the peak of each phase the child announces (load, fit); 'fit growth'
is the fit peak minus the RSS when fit starts. The child also reads its own
VmHWM, reset (/proc/self/clear_refs) just before fit: the kernel's exact
peak, a check on the sampling. A child whose RSS passes --max-rss-gib
(default: the memory available at the start, less 2 GiB; the machine may
be shared) or that runs past --max-minutes is killed, and its row says so:
'> cap' means it did not fit under the cap.

The target of issue 15: at 8,192 tokens the chunked run's fit peak is at
most half the plain one's (or the plain one does not fit in 24 GiB and
the chunked one does). The ratios are printed, never asserted.

Notes: with C >= the sequence length, chunked attention runs the layer's
own attention (a short query), so only the loss is chunked. The chunked
attention visits every key block, also those the causal mask hides.

Disk: the checkpoint size is printed up front (2.47 GB at 1b, 0.07 GB at
tiny) and the run refuses when less is free; what it wrote is deleted at
the end, also on failure, unless --keep. Not a test: it asserts nothing and
never runs in CI.

Run: python benchmarks/long_context.py [--size {1b,tiny}] [--lengths
     512,2048,8192] [--vocab 128256] [--steps N] [--warmup N] [--chunk C]
     [--quick] [--modes plain,chunked] [--max-rss-gib G] [--max-minutes M]
     [--dir DIR] [--keep]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from _checkpoints import Shape
from _checkpoints import checkpoint_dir
from _checkpoints import param_counts
from big_model import APPLY_KWARGS
from big_model import GIB
from big_model import proc_status

# Llama 3.2: rotary embeddings with its "llama3" frequency scaling.
LLAMA3 = (
    ("max_position_embeddings", 131072),
    ("rope_theta", 500000.0),
    ("rope_scaling", {"rope_type": "llama3", "factor": 32.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}),
)  # fmt: skip
# hidden, layers, heads, kv heads, intermediate, vocab (--vocab), max shard
SIZES = {
    "1b": Shape(2048, 16, 32, 8, 8192, 128256, 2 * 10**9, True, LLAMA3),
    "tiny": Shape(256, 2, 8, 2, 704, 128256, 10**9, True, LLAMA3),
}
_PHASE, _RESULT = "PHASE ", "RESULT "
MODES = ("plain", "chunked")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# -- the child: load, compile, fit ---------------------------------------------


def run_child(args):
    """One mode at one length, in this fresh process; returns readings."""
    import keras_qlora  # noqa: I001 (first: it picks TF's allocator)

    import keras
    import keras_hub
    import numpy as np

    print(_PHASE + "load", flush=True)
    kwargs = dict(APPLY_KWARGS)
    if args.child == "chunked":
        kwargs.update(attention_chunk_size=args.chunk,
                      lm_loss_chunk_size=args.chunk)  # fmt: skip
    start = time.perf_counter()
    model = keras_qlora.from_preset(
        keras_hub.models.LlamaCausalLM, args.dir, dtype="bfloat16",
        model_kwargs={"preprocessor": None}, **kwargs,
    )  # fmt: skip
    load_s = time.perf_counter() - start
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    n, seq = args.warmup + args.steps, args.length
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (n, seq + 1), "int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((n, seq), "int32")}
    times = []

    class Phases(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            times.append(time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            times[-1] = time.perf_counter() - times[-1]
            print(f"{_PHASE}step {batch + 1}/{n} {times[-1]:.1f} s", flush=True)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current RSS
    print(_PHASE + "fit", flush=True)
    history = model.fit(x, ids[:, 1:], batch_size=1, epochs=1, shuffle=False,
                        verbose=0, callbacks=[Phases()])  # fmt: skip
    hwm = proc_status("VmHWM")[0]
    print(_PHASE + "done", flush=True)
    timed = times[args.warmup :]
    return dict(load_s=load_s, hwm=hwm, warmup_s=times[: args.warmup],
                s=sum(timed) / len(timed) if timed else None,
                loss=history.history["loss"][-1])  # fmt: skip


# -- the parent: sampling, caps ------------------------------------------------


def _rss(pid):
    """Resident bytes of process `pid` (None once it has exited)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class Watch:
    """Samples a child's RSS; per-phase peaks; kills it past the caps."""

    def __init__(self, proc, cap, deadline, interval=0.01):
        self.proc, self.cap, self.deadline = proc, cap, deadline
        self.phase, self.killed, self.result, self.lines = (
            "start",
            None,
            None,
            [],
        )
        self.peaks, self.starts = {}, {}
        self._threads = [threading.Thread(target=f, daemon=True)
                         for f in (self._read, self._sample)]  # fmt: skip
        self.interval = interval
        for t in self._threads:
            t.start()

    def _read(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(_PHASE):
                name = line[len(_PHASE) :].split()[0]
                if name != "step":
                    self.phase = name
                    self.starts[name] = _rss(self.proc.pid)
                print(f"    {line[len(_PHASE) :]}", flush=True)
            elif line.startswith(_RESULT):
                self.result = json.loads(line[len(_RESULT) :])
            else:
                self.lines = (self.lines + [line])[-40:]

    def _sample(self):
        while self.proc.poll() is None:
            rss = _rss(self.proc.pid)
            if rss is None:
                break
            phase = self.phase
            self.peaks[phase] = max(self.peaks.get(phase, 0), rss)
            why = None
            if rss > self.cap:
                why = f"> cap ({self.cap / GIB:.1f} GiB RSS, in {phase})"
            elif time.monotonic() > self.deadline:
                why = f"timed out (in {phase})"
            if why and not self.killed:
                self.killed = why
                os.kill(self.proc.pid, signal.SIGKILL)
            time.sleep(self.interval)

    def join(self):
        self.proc.wait()
        for t in self._threads:
            t.join()


def spawn(mode, length, args, directory):
    """Runs one configuration in a fresh interpreter; returns its row."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode,
           "--dir", directory, "--length", str(length), "--vocab",
           str(args.vocab), "--chunk", str(args.chunk), "--steps",
           str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, env.get("PYTHONPATH")) if p
    )
    print(f"  {mode} at {length} tokens ...", flush=True)
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env)  # fmt: skip
        watch = Watch(proc, args.max_rss_gib * GIB,
                      start + 60 * args.max_minutes)  # fmt: skip
        watch.join()
        err.seek(0)
        stderr = err.read()
    row = dict(mode=mode, length=length, peaks=watch.peaks,
               fit_start=watch.starts.get("fit"), killed=watch.killed,
               wall=time.monotonic() - start)  # fmt: skip
    if watch.result is None and not watch.killed:
        tail = "\n".join(watch.lines)[-1500:] + "\n" + stderr[-2500:]
        row["killed"] = f"FAILED (exit {proc.returncode})"
        print(f"  FAILED (exit {proc.returncode}):\n{tail}", flush=True)
    row.update(watch.result or {})
    note = f"; {row['killed']}" if row["killed"] else ""
    print(f"  done in {row['wall']:.0f} s{note}", flush=True)
    return row


# -- the table -----------------------------------------------------------------


def _gib(value):
    return "-" if value is None else f"{value / GIB:.2f}"


def _fit_peak(row):
    """The sampled peak over fit (warm-up and timed steps)."""
    return max((row["peaks"].get(p, 0) for p in ("fit", "done")), default=0)


def print_table(args, shape, rows):
    """A markdown table of the rows, then the chunked/plain ratios."""
    total, linear = param_counts(shape)
    print(
        f"\nLlama, {total / 1e6:,.0f} M parameters ({linear / 1e6:,.0f} M in "
        f"linear layers -> NF4), hidden {shape.hidden}, {shape.layers} "
        f"layers, {shape.heads}/{shape.kv_heads} heads, vocabulary "
        f"{shape.vocab}, tied head; LoRA r=8 on all linear layers, gradient "
        "checkpointing, 8-bit AdamW, bfloat16; batch 1; chunked = "
        f"attention_chunk_size={args.chunk}, lm_loss_chunk_size={args.chunk}; "
        f"{args.warmup} warm-up + {args.steps} timed step(s)"
        f"{' (tracing included)' if args.warmup == 0 else ''}; "
        f"{os.cpu_count()} CPUs; cap {args.max_rss_gib:.1f} GiB RSS. "
        "Sizes in GiB; fit peak: sampled every 10 ms by the parent; VmHWM: "
        "the child's own; growth: fit peak minus RSS when fit starts.\n"
    )
    print("| tokens | mode | fit peak RSS | VmHWM | fit growth | load peak "
          "| s / step | warm-up s | loss | note |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak, start = _fit_peak(r), r["fit_start"]
        growth = peak - start if peak and start else None
        warm = "+".join(f"{s:.0f}" for s in r.get("warmup_s") or []) or "-"
        s = r.get("s")
        cells = [r["length"], r["mode"], _gib(peak or None), _gib(r.get("hwm")),
                 _gib(growth), _gib(r["peaks"].get("load")),
                 "-" if s is None else f"{s:.1f}", warm,
                 "-" if "loss" not in r else f"{r['loss']:.3f}",
                 r["killed"] or ""]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print()
    for length in args.lengths:
        pair = {r["mode"]: r for r in rows if r["length"] == length}
        if len(pair) < 2:
            continue
        a, b = pair["chunked"], pair["plain"]
        note = " (plain killed: its true peak is higher)" if b["killed"] else ""
        ra = _fit_peak(a) / max(_fit_peak(b), 1)
        print(f"{length} tokens: chunked / plain fit peak = {ra:.2f}{note}")
    scores = 4 * shape.heads * max(args.lengths) ** 2
    logits = 4 * max(args.lengths) * shape.vocab
    print(f"(arithmetic at {max(args.lengths)} tokens: float32 attention "
          f"scores of one layer {scores / GIB:.2f} GiB; float32 logits "
          f"{logits / GIB:.2f} GiB)")  # fmt: skip


def main(argv=None):
    """Writes the checkpoint, runs the children, prints, cleans up."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--modes", default=",".join(MODES))
    quick = "tiny model, 256 and 1024 tokens, chunk 128"
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--max-rss-gib", type=float)
    parser.add_argument("--max-minutes", type=float, default=120.0)
    parser.add_argument("--dir", help="where to write (default: a temp dir)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(_RESULT + json.dumps(run_child(args)), flush=True)
        return
    if args.quick:
        args.size, args.lengths, args.chunk = "tiny", "256,1024", 128
    args.lengths = [int(n) for n in args.lengths.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: pick from {MODES}. Received: {args.modes}")
    if args.max_rss_gib is None:
        args.max_rss_gib = proc_available() / GIB - 2
    shape = SIZES[args.size]._replace(vocab=args.vocab)
    label = f"Llama {args.size} (vocabulary {args.vocab})"
    with checkpoint_dir(shape, args.dir, args.keep, label) as directory:
        rows = [spawn(mode, length, args, directory)
                for length in args.lengths for mode in modes]  # fmt: skip
        print_table(args, shape, rows)


def proc_available():
    """MemAvailable of this machine, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main()
