"""Random-weight Llama checkpoints on disk, Hugging Face layout (benchmarks).

Shared by benchmarks/big_model.py and benchmarks/long_context.py. A
checkpoint is written in bfloat16 (config.json, model.safetensors.index.json,
shards of at most `Shape.shard_bytes`, HF tensor names, torch [out, in]
kernels), one shard at a time, so the whole model is never in memory.

Weights: N(0, 0.02), drawn from a 65536-entry table of the normal's
quantiles in bfloat16 (~300 M weights/s); norms are ones. Needs numpy,
ml_dtypes and safetensors only (no TensorFlow).
"""

import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import typing


class Shape(typing.NamedTuple):
    """A Llama: sizes, the largest shard, tied head, more config.json keys."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    inter: int
    vocab: int
    shard_bytes: int
    tied: bool = False
    config: tuple = ()  # (key, value) pairs added to config.json


def tensor_shapes(shape):
    """HF names and [out, in] shapes of a Llama checkpoint, in file order."""
    hidden, kv = shape.hidden, shape.hidden // shape.heads * shape.kv_heads
    inter = shape.inter
    layer = {
        "input_layernorm": (hidden,),
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "post_attention_layernorm": (hidden,),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    shapes = [("model.embed_tokens.weight", (shape.vocab, hidden))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        shapes += [(f"{p}{k}.weight", s) for k, s in layer.items()]
    shapes.append(("model.norm.weight", (hidden,)))
    if not shape.tied:
        shapes.append(("lm_head.weight", (shape.vocab, hidden)))
    return shapes


def param_counts(shape):
    """(all parameters, parameters of the linear layers that become NF4)."""
    shapes = tensor_shapes(shape)
    total = sum(math.prod(s) for _, s in shapes)
    return total, sum(math.prod(s) for name, s in shapes if "_proj." in name)


def checkpoint_bytes(shape):
    """Disk the checkpoint takes (bfloat16 tensors, plus 1 MB of headers)."""
    return 2 * param_counts(shape)[0] + 10**6


def hf_config(shape):
    """config.json of a `LlamaForCausalLM` of this shape."""
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        hidden_size=shape.hidden, intermediate_size=shape.inter,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
        hidden_act="silu", tie_word_embeddings=shape.tied,
        torch_dtype="bfloat16",
    )  # fmt: skip
    return dict(config, **dict(shape.config))


def random_bf16(rng, table, shape, chunk=1 << 24):
    """A bfloat16 array of `shape`: `table` at uniform random indices."""
    import ml_dtypes
    import numpy as np

    out = np.empty(shape, ml_dtypes.bfloat16)
    flat = out.reshape(-1)
    for start in range(0, flat.size, chunk):
        n = min(chunk, flat.size - start)
        raw = rng.bit_generator.random_raw((n + 3) // 4).view(np.uint16)
        np.take(table, raw[:n], out=flat[start : start + n])
    return out


def plan_shards(shape):
    """The tensors, in order, grouped into shards of at most the max bytes."""
    shards, nbytes = [[]], 0
    for name, dims in tensor_shapes(shape):
        if shards[-1] and nbytes + 2 * math.prod(dims) > shape.shard_bytes:
            shards.append([])
            nbytes = 0
        shards[-1].append((name, dims))
        nbytes += 2 * math.prod(dims)
    return shards


def write_checkpoint(shape, directory, written):
    """Writes the shards one at a time, appending each path to `written`."""
    import ml_dtypes
    import numpy as np
    import safetensors.numpy

    normal = statistics.NormalDist(0.0, 0.02)
    quantiles = [normal.inv_cdf((i + 0.5) / 65536) for i in range(65536)]
    table = np.array(quantiles, np.float32).astype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    shards = plan_shards(shape)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, dims in shard:
            if name.endswith("norm.weight"):
                tensors[name] = np.ones(dims, ml_dtypes.bfloat16)
            else:
                tensors[name] = random_bf16(rng, table, dims)
            weight_map[name] = fname
            total += tensors[name].nbytes
        written.append(os.path.join(directory, fname))
        safetensors.numpy.save_file(tensors, written[-1], {"format": "pt"})
        del tensors
        gb = os.path.getsize(written[-1]) / 1e9
        print(f"  wrote {fname} ({gb:.2f} GB)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for fname, content in (
        ("model.safetensors.index.json", index),
        ("config.json", hf_config(shape)),
    ):
        written.append(os.path.join(directory, fname))
        with open(written[-1], "w") as f:
            json.dump(content, f, indent=2)


@contextlib.contextmanager
def checkpoint_dir(shape, directory=None, keep=False, label="Llama"):
    """Writes the checkpoint; yields its directory; deletes what it wrote.

    Prints the disk needed first and exits when less is free. Deletes on
    the way out, also on failure or Ctrl-C, unless `keep`: the whole
    directory if it made it, else only the files it wrote.
    """
    need = checkpoint_bytes(shape)
    created = directory is None or not os.path.exists(directory)
    directory = os.path.abspath(directory or tempfile.mkdtemp(prefix="llama_"))
    print(f"{label}: the checkpoint needs {need / 1e9:.2f} GB of disk, in "
          f"{directory}", flush=True)  # fmt: skip
    written = []
    try:
        os.makedirs(directory, exist_ok=True)
        free = shutil.disk_usage(directory).free
        if free < need * 1.02:
            sys.exit(f"Not enough disk space in {directory}: the checkpoint "
                     f"needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB are "
                     "free. Pass --dir on a larger disk.")  # fmt: skip
        start = time.perf_counter()
        write_checkpoint(shape, directory, written)
        print(f"  written in {time.perf_counter() - start:.0f} s", flush=True)
        yield directory
    finally:
        if keep:
            print(f"checkpoint kept in {directory}")
        elif created:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            for path in written:
                if os.path.exists(path):
                    os.remove(path)
