"""What grows RSS during `fit` of a QLoRA model: a breakdown.

Builds a random keras_hub `LlamaBackbone` (default: hidden 1024, 8 layers,
16 heads, 4 KV heads, intermediate 2816, vocabulary 32000) in --dtype,
applies `keras_qlora.apply(target_modules="all-linear", rank=8,
gradient_checkpointing=..., optimizer_8bit=...)` and trains batch 1 x
sequence 128 with next-token cross-entropy on the untied lm_head (the token
embedding's `reverse_embeddings`), as benchmarks/big_model.py does.

Each config runs in a fresh subprocess. In the child, the train step is
split into phases, each measured (RSS sampled every 5 ms from
/proc/self/status; heap from glibc's mallinfo2):

  built    RSS once the model is built and converted (before compile)
  trace    `get_concrete_function` of the step: the traced graph only
           (forward, gradient, optimizer) - no tensor is computed
  step 1   the first call: TF instantiates the function (Grappler
           rewrites the graph, kernels are created) and runs it
  trim     `keras_qlora.convert.release_free_memory()` (malloc_trim):
           what RSS drops is free heap that malloc had kept
  steps    further steps: peak and RSS after each

With `--fit`, the same model runs `model.fit` instead (Keras' own train
function; the package's trimming hooks apply), and the table gives RSS
before fit, the peak per step and RSS after each step.

Graph size: nodes of the step's graph and of every function in its
library (the gradient functions of recompute_grad / custom_gradient are
functions), and the serialized GraphDef bytes.

TF's tensor peak: with `--allocator tf` (TF_ONEDNN_USE_SYSTEM_ALLOCATOR=0,
TF's BFC pool) `tf.config.experimental.get_memory_info("CPU:0")` gives the
bytes handed out to tensors; the system allocator keeps no statistics.

Run: python benchmarks/fit_growth.py [--layers 4,8] [--hidden 1024]
     [--dtype bfloat16] [--remat both|on|off] [--opt8 on|off]
     [--allocator system|tf|both] [--fit] [--steps 4] [--compare]

--compare runs each config twice: with the package's fixes switched off
(AdamW8bit's per-variable update; no heap trim after the first train step)
and as shipped.
Not a test: it asserts nothing.
"""

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time

MIB = 1024**2
_RESULT = "RESULT "


def proc_status(*fields):
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in fields:
                values[key] = int(line.split()[1]) * 1024
    return [values[field] for field in fields]


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
        "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def heap():
    """glibc's view (all arenas): bytes in use, free in the heap, mmapped."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _Mallinfo2
    m = fn()
    return {"in_use": m.uordblks + m.hblkhd, "free_kept": m.fordblks,
            "mmapped": m.hblkhd}  # fmt: skip


class Meter(threading.Thread):
    def __init__(self, interval=0.005):
        super().__init__(daemon=True)
        self.interval, self._done = interval, threading.Event()
        self.before = proc_status("VmRSS")[0]
        self.peak = self.before
        self.start()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, proc_status("VmRSS")[0])
            time.sleep(self.interval)

    def stop(self):
        self._done.set()
        self.join()
        self.peak = max(self.peak, proc_status("VmRSS")[0])
        return self.peak


def snapshot(label, rows, peak=None):
    rss, anon = proc_status("VmRSS", "RssAnon")
    row = {"phase": label, "rss": rss, "anon": anon, "peak": peak}
    row.update(heap())
    rows.append(row)
    return row


def graph_size(concrete):
    gdef = concrete.graph.as_graph_def()
    lib = gdef.library.function
    return {"nodes": len(gdef.node) + sum(len(f.node_def) for f in lib),
            "functions": len(lib), "graphdef_bytes": gdef.ByteSize()}


def tf_allocator():
    import tensorflow as tf

    try:
        info = tf.config.experimental.get_memory_info("CPU:0")
    except (ValueError, RuntimeError):
        return None
    return info if info.get("peak") else None


def build(args):
    import keras
    import keras_hub

    import keras_qlora

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=args.vocab, num_layers=args.layers, num_query_heads=16,
        hidden_dim=args.hidden, intermediate_dim=args.intermediate,
        num_key_value_heads=4, dtype=args.dtype)  # fmt: skip
    model = keras_qlora.apply(
        backbone, target_modules="all-linear", rank=8,
        gradient_checkpointing=args.remat == "on",
        optimizer_8bit=args.opt8 == "on", verbose=False)  # fmt: skip
    return model


def lm_loss(backbone):
    import keras

    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(y_true, hidden):
        logits = backbone.token_embedding(hidden, reverse=True)
        return ce(y_true, keras.ops.cast(logits, "float32"))

    return loss


def data(args, n):
    import numpy as np

    ids = np.random.default_rng(0).integers(
        0, args.vocab, (n, args.seq + 1), "int32"
    )
    x = {"token_ids": ids[:, :-1],
         "padding_mask": np.ones((n, args.seq), "int32")}  # fmt: skip
    return x, ids[:, 1:]


def child(args):
    import keras_qlora  # first: sets the allocator default

    import keras
    import tensorflow as tf

    from keras_qlora import convert
    from keras_qlora import model as qlora_model
    from keras_qlora.training.adam8bit import AdamW8bit

    if args.before:
        # The package before the fixes: per-variable 8-bit updates, no trim
        # after the first step.
        AdamW8bit._fused_update_enabled = False
        qlora_model._trim_after_first_call = lambda function: function
    rows = []
    snapshot("import", rows)
    model = build(args)
    gc.collect()
    convert.release_free_memory()
    snapshot("built", rows)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4),
                  loss=lm_loss(model.base_model))  # fmt: skip
    x, y = data(args, args.steps)
    out = {"rows": rows}
    if args.fit:
        meters = []

        class Probe(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                meters.append(Meter())

            def on_train_batch_end(self, batch, logs=None):
                peak = meters[-1].stop()
                snapshot(f"step {batch + 1}", rows, peak)

        meter = Meter()
        model.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0,
                  callbacks=[Probe()])  # fmt: skip
        meter.stop()
        snapshot("after fit", rows, meter.peak)
        gc.collect()
        convert.release_free_memory()
        snapshot("trim", rows)
        fn = getattr(model.train_function, "__wrapped__", model.train_function)
        # Keras' train function is a Python closure over its tf.functions.
        cells = [c.cell_contents for c in fn.__closure__ or ()]
        concretes = [c for f in cells
                     if hasattr(f, "_list_all_concrete_functions")
                     for c in f._list_all_concrete_functions()]  # fmt: skip
        out["graph"] = [graph_size(c) for c in concretes]
        out["traces"] = len(concretes)
    else:
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        snapshot("optimizer built", rows)

        @tf.function(reduce_retracing=True)
        def step(x, y):
            return model.train_step((x, y))

        xs = [{k: tf.constant(v[i : i + 1]) for k, v in x.items()}
              for i in range(args.steps)]  # fmt: skip
        ys = [tf.constant(y[i : i + 1]) for i in range(args.steps)]
        meter = Meter()
        concrete = step.get_concrete_function(xs[0], ys[0])
        snapshot("trace", rows, meter.stop())
        out["graph"] = [graph_size(concrete)]
        for i in range(args.steps):
            meter = Meter()
            concrete(xs[i], ys[i])
            snapshot(f"step {i + 1}", rows, meter.stop())
            if i == 0:
                gc.collect()
                convert.release_free_memory()
                snapshot("trim", rows)
        gc.collect()
        convert.release_free_memory()
        snapshot("trim end", rows)
    out["tf"] = tf_allocator()
    out["lora_bytes"] = sum(
        int(v.numpy().nbytes) for v in model.trainable_variables
    )
    out["opt_bytes"] = sum(
        int(v.numpy().nbytes) for v in model.optimizer.variables
    )
    unique = {id(w): w for w in model.weights}.values()
    out["weight_bytes"] = sum(int(v.numpy().nbytes) for v in unique)
    return out


def spawn(args, layers, remat, allocator, before=False):
    cmd = [sys.executable, os.path.abspath(__file__), "--child",
           "--layers", str(layers), "--remat", remat, "--opt8", args.opt8,
           "--hidden", str(args.hidden), "--intermediate",
           str(args.intermediate), "--vocab", str(args.vocab),
           "--dtype", args.dtype, "--steps", str(args.steps),
           "--seq", str(args.seq)]  # fmt: skip
    cmd += ["--fit"] if args.fit else []
    cmd += ["--before"] if before else []
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    system = "1" if allocator == "system" else "0"
    env["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] = system
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT) :])
    raise RuntimeError(proc.stderr[-3000:])


def report(label, res):
    print(f"\n### {label}")
    for g in res.get("graph", []):
        print(f"graph: {g['nodes']} nodes, {g['functions']} functions, "
              f"{g['graphdef_bytes'] / MIB:.1f} MiB GraphDef")  # fmt: skip
    if res.get("tf"):
        print(f"TF allocator: live {res['tf']['current'] / MIB:.0f} MiB, "
              f"peak {res['tf']['peak'] / MIB:.0f} MiB")  # fmt: skip
    print(f"weights {res['weight_bytes'] / MIB:.0f} MiB, trained "
          f"{res['lora_bytes'] / MIB:.1f} MiB, optimizer state "
          f"{res['opt_bytes'] / MIB:.1f} MiB")  # fmt: skip
    print("| phase | RSS | delta | peak | RssAnon | heap in use | "
          "heap free kept |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    prev = None
    for r in res["rows"]:
        def m(v):
            return "" if v is None else f"{v / MIB:.0f}"

        delta = "" if prev is None else f"{(r['rss'] - prev) / MIB:+.0f}"
        print(f"| {r['phase']} | {m(r['rss'])} | {delta} | {m(r['peak'])} | "
              f"{m(r['anon'])} | {m(r.get('in_use'))} | "
              f"{m(r.get('free_kept'))} |")  # fmt: skip
        prev = r["rss"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="8")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--remat", choices=("on", "off", "both"), default="on")
    p.add_argument("--opt8", choices=("on", "off"), default="on")
    p.add_argument("--allocator", choices=("system", "tf", "both"),
                   default="system")  # fmt: skip
    p.add_argument("--fit", action="store_true")
    p.add_argument("--compare", action="store_true",
                   help="also run each config with the fixes off")
    p.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true")
    args = p.parse_args(argv)
    if args.child:
        args.layers = int(args.layers)
        print(_RESULT + json.dumps(child(args)), flush=True)
        return
    remats = ("on", "off") if args.remat == "both" else (args.remat,)
    allocs = ("system", "tf") if args.allocator == "both" else (args.allocator,)
    for layers in [int(n) for n in args.layers.split(",")]:
        for remat in remats:
            for alloc in allocs:
                label = (f"{layers} layers, hidden {args.hidden}, {args.dtype}"
                         f", remat {remat}, 8-bit {args.opt8}, allocator "
                         f"{alloc}, {'fit' if args.fit else 'phases'}")
                for before in (True, False) if args.compare else (False,):
                    tag = ", BEFORE the fixes" if before else ""
                    report(label + tag,
                           spawn(args, layers, remat, alloc, before))


if __name__ == "__main__":
    main()
