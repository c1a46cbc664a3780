"""Big-model load and train memory: `keras_qlora.from_preset` at 1B / 7B.

Writes a random-weight Llama checkpoint in bfloat16, Hugging Face layout
(config.json, model.safetensors.index.json, shards of at most 2 GB, HF
tensor names, torch [out, in] kernels), one shard at a time, so the whole
model is never in memory. Then, each in a fresh subprocess:

  a   `keras_qlora.from_preset(LlamaBackbone, dir, dtype="bfloat16",
      target_modules="all-linear", rank=8, gradient_checkpointing=True,
      optimizer_8bit=True)`: seconds, peak RSS, RSS after, NF4 bytes;
  b   `fit` on that model, same process: batch 1, sequence 128, random
      tokens, next-token cross-entropy, AdamW(1e-4) (8-bit); 1 warm-up
      step (tracing), then 3 timed steps: peak RSS, median s per step;
  c1  `LlamaBackbone.from_preset(dir, dtype="bfloat16")`, then
      `keras_qlora.apply(...)`, same arguments: the float model that
      from_preset never builds;
  c2  the same float load, then Keras' own `backbone.quantize("int4")`.
      c1 and c2 are skipped at 7b (the float model does not fit) and with
      --skip-compare.

The model is the backbone: the loss applies its untied lm_head (the token
embedding's `reverse_embeddings`) to the hidden states, as a
`LlamaCausalLM`, which holds the same variables, would.

Peak RSS: a thread samples /proc/self/status every 20 ms ('sampled'), and
VmHWM is reset (/proc/self/clear_refs) just before the measured call.
'growth' is the sampled peak minus the RSS just before the call. VmRSS also
counts pages of memory-mapped shards (RssFile: keras_hub's own loader maps
every shard until it is done), which the kernel can drop; 'anon growth' is
the growth of RssAnon alone. The final table puts the arithmetic (params x
4 bytes, x 2 bytes, NF4 at 4.127 bits per linear weight + bfloat16 rest)
beside the measured rows. The checkpoint has just been written: it is read
from the page cache, not from disk. --allocator system (the default, as
`import keras_qlora` sets it) runs the children with
TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1; tf with 0: TF's oneDNN pool, which keeps
what is freed, so 'RSS after' stays near the peak.

Weights: N(0, 0.02) (benchmarks/_checkpoints.py writes the checkpoint).

Disk: 0.11 GB (tiny), 2.2 GB (1b), 13.5 GB (7b), printed up front; the run
refuses when less is free. What it wrote is deleted at the end, also on
failure, unless --keep. Not a test: it asserts nothing and never runs in
CI. On 2 cores: tiny ~1 min, 1b ~5 min.

Run: python benchmarks/big_model.py --size {tiny,1b,7b} [--dir DIR]
     [--keep] [--skip-fit] [--skip-compare] [--allocator system|tf]
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from _checkpoints import Shape
from _checkpoints import checkpoint_dir
from _checkpoints import param_counts

# hidden, layers, heads, kv heads, intermediate, vocab, max shard bytes
SIZES = {
    "tiny": Shape(512, 8, 8, 4, 1408, 32000, 40 * 10**6),
    "1b": Shape(2048, 22, 32, 4, 5632, 32000, 2 * 10**9),  # TinyLlama
    "7b": Shape(4096, 32, 32, 32, 11008, 32000, 2 * 10**9),  # Llama-2-7b
}
APPLY_KWARGS = dict(
    target_modules="all-linear",
    rank=8,
    gradient_checkpointing=True,
    optimizer_8bit=True,
    verbose=False,
)
NF4_BITS = 4.127
WARMUP, STEPS, SEQ = 1, 3, 128
_RESULT = "RESULT "
GIB = 1024**3


# -- memory readings (child processes) -----------------------------------------


def proc_status(*fields):
    """`kB` fields of /proc/self/status (VmRSS, VmHWM, RssAnon), in bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in fields:
                values[key] = int(line.split()[1]) * 1024
    return [values[field] for field in fields]


class Meter(threading.Thread):
    """Peak VmRSS and RssAnon, sampled every 20 ms, and VmHWM, over a span."""

    def __init__(self, interval=0.02):
        super().__init__(daemon=True)
        gc.collect()
        self.interval, self._done = interval, threading.Event()
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0).
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.before, self.anon_before = proc_status("VmRSS", "RssAnon")
        self.peak, self.anon = self.before, self.anon_before
        self.start()

    def run(self):
        while not self._done.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self):
        """Reads RSS once and keeps the peaks."""
        rss, anon = proc_status("VmRSS", "RssAnon")
        self.peak, self.anon = max(self.peak, rss), max(self.anon, anon)

    def stop(self):
        """Ends the span; returns its readings (bytes)."""
        self._done.set()
        self.join()
        self.sample()
        hwm = proc_status("VmHWM")[0] if self.hwm_reset else None
        return {"before": self.before, "sampled": self.peak, "hwm": hwm,
                "anon_growth": self.anon - self.anon_before}  # fmt: skip


def measured(*stages):
    """Runs the stages (each gets the previous one's result) under a Meter.

    Returns (the last result, readings + seconds per stage + RSS after).
    """
    meter, result, seconds = Meter(), None, []
    for stage in stages:
        start = time.perf_counter()
        result = stage(result)
        seconds.append(time.perf_counter() - start)
    readings = meter.stop()
    gc.collect()
    after = proc_status("VmRSS")[0]
    return result, dict(readings, s=sum(seconds), stages=seconds, after=after)


# -- the children --------------------------------------------------------------


def load_backbone(directory):
    """keras_hub's own float load of the backbone, in bfloat16."""
    from keras_hub.models import LlamaBackbone

    return LlamaBackbone.from_preset(directory, dtype="bfloat16")


def lm_loss(backbone):
    """Next-token cross-entropy on the logits of the untied lm_head."""
    import keras

    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(y_true, hidden):
        logits = backbone.token_embedding(hidden, reverse=True)
        return ce(y_true, keras.ops.cast(logits, "float32"))

    return loss


def fit(model, vocab):
    """1 warm-up + 3 timed steps of `fit`: peak RSS, seconds per step."""
    import keras
    import numpy as np

    n = WARMUP + STEPS
    ids = np.random.default_rng(0).integers(0, vocab, (n, SEQ + 1), "int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((n, SEQ), "int32")}
    opt = keras.optimizers.AdamW(1e-4)
    model.compile(optimizer=opt, loss=lm_loss(model.base_model))
    times, meters = [], [Meter()]

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == WARMUP:  # the warm-up span ends, the timed one starts
                meters[0] = meters[0].stop()
                meters.append(Meter())
            times.append(time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            times[-1] = time.perf_counter() - times[-1]

    history = model.fit(x, ids[:, 1:], batch_size=1, epochs=1, shuffle=False,
                        verbose=0, callbacks=[Timer()])  # fmt: skip
    warm, steady = meters[0], meters[1].stop()
    keys = ("sampled", "hwm", "anon_growth")
    out = {k: max(warm[k] or 0, steady[k] or 0) for k in keys}
    return dict(out, before=warm["before"], after=proc_status("VmRSS")[0],
                s=statistics.median(times[WARMUP:]), warmup_s=times[0],
                steady=steady["sampled"],
                loss=history.history["loss"][-1])  # fmt: skip


def weight_bytes(model, prefix=""):
    """Bytes of the model's variables (those whose name has `prefix`)."""
    from keras_qlora import convert

    unique = {id(v): v for v in model.weights if v.name.startswith(prefix)}
    return sum(convert.nbytes(v) for v in unique.values())


def run_child(args):
    """One measurement in this (fresh) process; returns its readings."""
    import keras_qlora  # first: it picks TF's allocator (see --allocator)

    import keras_hub

    def quantize_int4(backbone):
        backbone.quantize("int4")
        return backbone

    def from_preset(_):
        return keras_qlora.from_preset(keras_hub.models.LlamaBackbone,
                                       args.dir, dtype="bfloat16",
                                       **APPLY_KWARGS)  # fmt: skip

    stages = {
        "qlora": [from_preset],
        "apply": [lambda _: load_backbone(args.dir),
                  lambda backbone: keras_qlora.apply(backbone, **APPLY_KWARGS)],
        "int4": [lambda _: load_backbone(args.dir), quantize_int4],
    }  # fmt: skip
    out = {"import": proc_status("VmRSS")[0]}
    model, out["load"] = measured(*stages[args.child])
    out["weights"] = weight_bytes(model)
    if args.child != "int4":
        out["nf4"] = weight_bytes(model, "nf4_")
    if args.child == "qlora" and not args.skip_fit:
        out["fit"] = fit(model, SIZES[args.size].vocab)
    return out


# -- driver (parent process) ---------------------------------------------------


def spawn(child, args):
    """Runs one child in a fresh interpreter; returns its readings."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", child,
           "--size", args.size, "--dir", args.dir]  # fmt: skip
    cmd += ["--skip-fit"] if args.skip_fit else []
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    system = args.allocator == "system"
    env["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] = "1" if system else "0"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = (root, env.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    print(f"running {child} ...", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"  {child} FAILED (exit {proc.returncode}):\n{tail}", flush=True)
        return {"error": proc.returncode}
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(lines[-1][len(_RESULT) :])


def _gib(value, digits=2):
    """Bytes as GiB, or '-'."""
    return "-" if value is None else f"{value / GIB:.{digits}f}"


def _row(label, r=None, weights=None):
    """One markdown row: s, peaks (sampled, VmHWM), growths, after, bytes."""
    cells = ["-"] * 6
    if r is not None and "error" in r:
        cells[0] = "FAILED"
    elif r is not None:
        s = " + ".join(f"{t:.1f}" for t in r.get("stages", [r["s"]]))
        cells = [s, _gib(r["sampled"]), _gib(r["hwm"]),
                 _gib(r["sampled"] - r["before"]), _gib(r["anon_growth"]),
                 _gib(r["after"])]  # fmt: skip
    return f"| {label} | " + " | ".join(cells + [_gib(weights, 3)]) + " |"


def print_table(args, results):
    """The final markdown table: the measured rows and the arithmetic."""
    total, linear = param_counts(SIZES[args.size])
    print(
        f"\nLlama {args.size}: {total / 1e9:.3f} B parameters "
        f"({linear / 1e9:.3f} B in linear layers), bfloat16 HF checkpoint; "
        "LoRA r=8 on all linear layers, gradient checkpointing, 8-bit "
        f"AdamW; fit: batch 1, sequence {SEQ}, {WARMUP} warm-up + {STEPS} "
        f"timed steps. {os.cpu_count()} CPUs, allocator {args.allocator}. "
        "Sizes in GiB; s: seconds (c: load + convert; b: median per step); "
        "growth: peak minus the RSS just before the call; weights: bytes of "
        "all the model's variables (NF4: the NF4 layers' storage alone).\n"
    )
    print("| row | s | peak RSS (sampled) | peak VmHWM | growth "
          "| anon growth | RSS after | weights |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    labels = {
        "qlora": "(a) keras_qlora.from_preset",
        "apply": "(c1) keras_hub from_preset + keras_qlora.apply",
        "int4": '(c2) keras_hub from_preset + quantize("int4") (embedding '
        "and lm_head become int4 too)",
    }
    for key, r in results.items():
        label = labels[key]
        if "nf4" in r:
            label += f" (NF4 {_gib(r['nf4'], 3)})"
        print(_row(label, r.get("load", r), r.get("weights")))
        if key == "qlora" and "fit" in r:
            f = r["fit"]
            print(_row(f"(b) fit (warm-up step {f['warmup_s']:.1f} s; timed "
                       f"steps' peak {_gib(f['steady'])}; loss "
                       f"{f['loss']:.3f})", f))  # fmt: skip
    nf4 = linear * NF4_BITS / 8 + 2 * (total - linear)
    print(_row("arithmetic: params x 4 B (float32)", weights=4 * total))
    print(_row("arithmetic: params x 2 B (bfloat16)", weights=2 * total))
    print(_row(f"arithmetic: linear x {NF4_BITS} bits + rest x 2 B", None, nf4))
    if "import" in results["qlora"]:
        rss = _gib(results["qlora"]["import"])
        print(f"\nRSS after importing TF/Keras/keras_hub: {rss}")


def main(argv=None):
    """Writes the checkpoint, runs the children, prints, cleans up."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--dir", help="where to write (default: a temp dir)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--skip-fit", action="store_true")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--allocator", choices=("system", "tf"),
                        default="system")  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(_RESULT + json.dumps(run_child(args)), flush=True)
        return
    label = f"Llama {args.size}"
    with checkpoint_dir(SIZES[args.size], args.dir, args.keep, label) as d:
        args.dir = d
        children = ["qlora"]
        if args.size != "7b" and not args.skip_compare:
            children += ["apply", "int4"]
        print_table(args, {child: spawn(child, args) for child in children})


if __name__ == "__main__":
    main()
