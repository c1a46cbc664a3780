"""Training memory and step time: float LoRA, Keras int4 LoRA, keras_qlora.

Builds a GPT-2-medium-sized keras_hub `GPT2Backbone` (24 layers, hidden
1024, 16 heads, intermediate 4096, vocab 50257, max sequence 1024, random
weights) with the tied-embedding causal-LM head (`token_embedding(h,
reverse=True)`, float32 and frozen in every config) and trains LoRA r=8 on
all its linear layers with AdamW, batch 2, sequence 128, next-token
cross-entropy. Configs, each in its own subprocess, one after the other:

  a  float32 model + Keras `enable_lora(8)` on every Dense/EinsumDense
  b  Keras `quantize("int4")` + `enable_lora(8)` on the same layers
  c  `keras_qlora.apply(model, rank=8, target_modules="all-linear")`
  d  (c) + gradient_checkpointing, optimizer_8bit, offload_optimizer
     (skipped, with the reason, if `apply()` does not take them)

In a and b every variable that is not a LoRA matrix is frozen, as apply()
does in c and d, so all configs train only adapters. Keras shapes an
EinsumDense adapter as `kernel.shape[:-1] + (r,)` x `(r, last)`, keras_qlora
as `(K, r)` x `(r, N)` on the 2-D view, so a and b train more parameters
at the same r (the 'trainable' column).

Memory is measured twice over: RSS (resident set size, from
/proc/self/status) is what the machine pays; 'tf live' / 'tf peak' are the
bytes TF's CPU allocator has handed out to tensors (where it keeps
statistics). They differ because, with oneDNN on (TF's default on x86),
TF serves large allocations from a BFC pool that never gives memory back
to the OS: the float kernels apply() frees stay resident in the pool
(reused by training), so RSS after apply stays at the float model's size.
`--allocator system` sets TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 (oneDNN kernels
unchanged, memory from malloc), and apply()'s malloc_trim then returns the
freed float kernels to the OS.

Measured per config:
  import     RSS after importing TF / Keras / keras_hub (the floor)
  built      RSS once the model is built and converted (after gc)
  fit peak   peak RSS while `fit` runs: VmHWM reset through
             /proc/self/clear_refs just before fit, read after it, and a
             background thread sampling VmRSS every 2 ms (the larger one)
  steady     peak RSS during the timed steps only (no tracing)
  lifetime   the process' peak RSS (construction included)
  step       median wall time of the timed steps (after the warm-up steps)

Targets (issue 4): c's fit peak <= 0.35x a's, c's built RSS <= 0.4x a's,
c's step time <= 1.1x a's. Not a test: it asserts nothing.

A full run takes about half an hour on a shared 2-core machine (a
GPT-2-medium step takes 7-12 s there, config b builds slowly);
`--layers 4 --steps 3 --warmup 2` gives a quick, smaller run (~3 min).

Run: python benchmarks/train_memory.py [--layers N] [--steps N]
     [--warmup N] [--configs a,b,c,d] [--allocator tf|system]
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

CONFIGS = {
    "a": "float32 + Keras enable_lora",
    "b": "Keras int4 + enable_lora",
    "c": "keras_qlora.apply",
    "d": "keras_qlora + remat/8bit/offload",
}
TARGETS = (("fit_peak", 0.35), ("built", 0.40), ("step", 1.10))
_RESULT = "RESULT "
GIB = 1024**3


# -- /proc readings -----------------------------------------------------------


def _status_bytes(field):
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def rss():
    return _status_bytes("VmRSS")


def reset_peak():
    """Resets VmHWM to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler(threading.Thread):
    """Samples VmRSS in the background; `peak` is the largest sample.

    TF ops release the GIL, so the thread keeps sampling during a step.
    """

    def __init__(self, interval=0.002):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = rss()
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, rss())
        return self.peak


class PeakMeter:
    """Peak RSS over a span: the sampler's and, where resettable, VmHWM's.

    `split()` closes the current span (returns its peak) and opens the next.
    """

    def __init__(self):
        self._hwm_resets = reset_peak()
        self._sampler = RssSampler()
        self._sampler.start()

    def split(self):
        peak = self._peak()
        self._hwm_resets = reset_peak()
        self._sampler.peak = rss()
        return peak

    def stop(self):
        self._sampler.stop()
        return self._peak()

    def _peak(self):
        hwm = _status_bytes("VmHWM") if self._hwm_resets else 0
        return max(self._sampler.peak, hwm, rss())


def tf_allocator():
    """Bytes TF's CPU allocator has handed out: `current` and `peak`.

    Unlike RSS, this excludes memory the allocator keeps cached for reuse.
    None where TF keeps no statistics (oneDNN off, or its system allocator,
    which reports zeros).
    """
    import tensorflow as tf

    try:
        info = tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        info = {}
    if not info.get("peak"):
        return {"current": None, "peak": None}
    return info


# -- the model ----------------------------------------------------------------


def build_lm(args):
    """GPT-2-medium-shaped backbone + tied-embedding LM head (Functional)."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50257,
        num_layers=args.layers,
        num_heads=16,
        hidden_dim=1024,
        intermediate_dim=4096,
        max_sequence_length=1024,
    )
    inputs = backbone.input
    hidden = backbone(inputs)
    logits = backbone.token_embedding(hidden, reverse=True)
    return keras.Model(inputs, logits, name="gpt2_lm")


def linear_layers(model):
    import keras

    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
    ]


def keras_lora(model, rank, int4):
    """Configs a / b: Keras' own int4 and LoRA, everything else frozen."""
    layers = linear_layers(model)
    for layer in layers:
        if int4:
            layer.quantize("int4")
        layer.enable_lora(rank)
    lora = {
        id(v)
        for layer in layers
        for v in (layer.lora_kernel_a, layer.lora_kernel_b)
    }
    for v in model.weights:
        v.trainable = id(v) in lora
    return model


def prepare(config, model, args):
    """The model to fit for `config`, or (None, reason) when skipped."""
    if config in ("a", "b"):
        return keras_lora(model, args.rank, int4=config == "b"), None
    import keras_qlora

    options = {}
    if config == "d":
        options = dict(
            gradient_checkpointing=True,
            optimizer_8bit=True,
            offload_optimizer=True,
        )
    try:
        return (
            keras_qlora.apply(
                model,
                rank=args.rank,
                target_modules="all-linear",
                verbose=False,
                **options,
            ),
            None,
        )
    except TypeError as err:
        if not options:
            raise
        return None, f"apply() does not take {sorted(options)} yet: {err}"


def batches(args):
    """Random token ids; the labels are the next tokens."""
    import numpy as np

    n = args.batch * (args.warmup + args.steps)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, (n, args.seq + 1)).astype("int32")
    x = {
        "token_ids": ids[:, :-1],
        "padding_mask": np.ones((n, args.seq), "int32"),
    }
    return x, ids[:, 1:]


# -- one config (child process) ------------------------------------------------


def run_config(config, args):
    """Builds, converts and fits one config; returns the measurements."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import keras_hub  # noqa: F401 (import cost counted in the floor)
    import tensorflow as tf

    from keras_qlora import ops as qops

    result = {"config": config, "rss_import": rss()}
    model, skipped = prepare(config, build_lm(args), args)
    if skipped:
        return dict(result, skipped=skipped)
    gc.collect()
    result["built"] = rss()
    result["tf_live_built"] = tf_allocator()["current"]
    result["trainable_params"] = int(
        sum(keras.ops.size(v) for v in model.trainable_variables)
    )
    result["op_path"] = qops.active_path()[0] if config in "cd" else "-"
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    x, y = batches(args)
    result["lifetime_before_fit"] = _status_bytes("VmHWM")
    if result["tf_live_built"] is not None:
        tf.config.experimental.reset_memory_stats("CPU:0")
    peaks = PeakMeter()
    # The warm-up steps (tracing included) and the timed steps get their
    # own peaks: the first is the fit peak's usual home.
    warmup_peak = []
    timer = StepTimer(on_first_timed=lambda: warmup_peak.append(peaks.split()))
    history = model.fit(
        x,
        y,
        batch_size=args.batch,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[timer.callback(args.warmup)],
    )
    result["steady_peak"] = peaks.stop()
    result["fit_peak"] = max(warmup_peak + [result["steady_peak"]])
    result["tf_peak_fit"] = tf_allocator()["peak"]
    result["lifetime"] = max(result["lifetime_before_fit"], result["fit_peak"])
    result["step"] = statistics.median(timer.times[args.warmup :])
    result["loss"] = [float(v) for v in history.history["loss"]]
    return result


class StepTimer:
    """Wall time of each training batch; a hook before the first timed one."""

    def __init__(self, on_first_timed=None):
        self.times = []
        self._start = None
        self._on_first_timed = on_first_timed

    def callback(self, warmup):
        import keras

        timer = self

        class _Callback(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                if batch == warmup and timer._on_first_timed is not None:
                    timer._on_first_timed()
                timer._start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                timer.times.append(time.perf_counter() - timer._start)

        return _Callback()


# -- driver (parent process) ---------------------------------------------------


def spawn(config, args):
    """Runs one config in a fresh interpreter; returns its result dict."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", config]
    cmd += ["--layers", str(args.layers), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--rank", str(args.rank)]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # Explicit both ways: `import keras_qlora` would otherwise pick malloc.
    env["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] = (
        "1" if args.allocator == "system" else "0"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, env.get("PYTHONPATH")) if p
    )
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"config": config, "error": f"exit {proc.returncode}:\n{tail}"}
    result = json.loads(lines[-1][len(_RESULT) :])
    result["wall"] = time.perf_counter() - start
    return result


def _gb(value):
    return f"{'-':>8}" if value is None else f"{value / GIB:8.2f}"


def _ratio(result, base, key):
    if base is None or key not in base or key not in result:
        return "     -"
    return f"{result[key] / base[key]:6.2f}"


def print_table(results, args):
    import keras
    import tensorflow as tf

    print(
        f"\nGPT2Backbone {args.layers} layers x hidden 1024 (vocab 50257), "
        f"batch {args.batch}, seq {args.seq}, LoRA r={args.rank} on all "
        f"linear layers, AdamW; {args.warmup} warm-up + {args.steps} timed "
        f"steps. TF {tf.__version__}, Keras {keras.__version__}, "
        f"{os.cpu_count()} CPUs, allocator {args.allocator}. GB = GiB; RSS "
        "from /proc/self/status; 'tf live' / 'tf peak' = bytes TF's CPU "
        "allocator has handed out after build / at most during fit."
    )
    head = (
        f"{'config':36} {'import':>8} {'built':>8} {'fit peak':>8} "
        f"{'steady':>8} "
        f"{'lifetime':>8} {'step s':>7} {'built/a':>7} {'peak/a':>6} "
        f"{'step/a':>6} {'tf live':>7} {'tf peak':>7} {'trainable':>10} "
        f"{'op':>7}"
    )
    print(head)
    print("-" * len(head))
    base = next(
        (r for r in results if r["config"] == "a" and "step" in r), None
    )
    for r in results:
        label = f"({r['config']}) {CONFIGS[r['config']]}"
        if "error" in r or "skipped" in r:
            print(f"{label:36} {r.get('skipped') or 'FAILED'}")
            continue
        print(
            f"{label:36} {_gb(r['rss_import'])} {_gb(r['built'])} "
            f"{_gb(r['fit_peak'])} {_gb(r['steady_peak'])} "
            f"{_gb(r['lifetime'])} {r['step']:7.2f} "
            f"{_ratio(r, base, 'built'):>7} {_ratio(r, base, 'fit_peak')} "
            f"{_ratio(r, base, 'step')} {_gb(r['tf_live_built'])[1:]} "
            f"{_gb(r['tf_peak_fit'])[1:]} {r['trainable_params']:10d} "
            f"{r['op_path']:>7}"
        )
    for r in results:
        if "error" in r:
            print(f"\n({r['config']}) failed: {r['error']}")
    print_targets(results, base)


def print_targets(results, base):
    ours = next(
        (r for r in results if r["config"] == "c" and "step" in r), None
    )
    if base is None or ours is None:
        print("\ntargets: need configs a and c")
        return
    print("\ntargets for (c) against (a):")
    names = {"fit_peak": "fit peak", "built": "built RSS", "step": "step time"}
    for key, limit in TARGETS:
        ratio = ours[key] / base[key]
        verdict = "met" if ratio <= limit else "MISSED"
        line = f"  {names[key]:10} {ratio:5.2f}x (target <= {limit}x) {verdict}"
        if key != "step":
            # The import floor (TF, Keras, keras_hub) is in both RSS values.
            net = (ours[key] - ours["rss_import"]) / (
                base[key] - base["rss_import"]
            )
            line += f"; above the import RSS: {net:.2f}x"
        print(line)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--configs", default="a,b,c,d")
    parser.add_argument(
        "--allocator",
        choices=("tf", "system"),
        default="tf",
        help="system: run the configs with TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 "
        "(TF then takes CPU memory from malloc, which can give it back, "
        "instead of its oneDNN BFC pool, which keeps it)",
    )
    parser.add_argument("--child", choices=sorted(CONFIGS), help="internal")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(
            f"--configs must be a subset of {sorted(CONFIGS)}. "
            f"Received: {unknown}"
        )
    if args.steps < 1 or args.warmup < 1 or args.layers < 1:
        parser.error("--steps, --warmup and --layers must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        result = run_config(args.child, args)
        print(_RESULT + json.dumps(result), flush=True)
        return
    results = []
    for config in args.configs:
        print(f"running ({config}) {CONFIGS[config]} ...", flush=True)
        results.append(spawn(config, args))
        wall = results[-1].get("wall")
        if wall is not None:
            print(f"  done in {wall:.0f} s", flush=True)
    print_table(results, args)


if __name__ == "__main__":
    main()
