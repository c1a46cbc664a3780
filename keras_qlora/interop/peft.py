"""PEFT LoRA adapters <-> keras_qlora adapters (keras_hub BERT and GPT-2).

PEFT stores, per HF module, `lora_A.weight` `[r, in]` and `lora_B.weight`
`[out, r]` and adds `(lora_alpha / r) * x @ A.T @ B.T` to the module's
output. Our layers add `scale * x @ A @ B` on their 2-D view `[K, N]`,
which is the HF weight transposed (see `names`), so A and B are PEFT's
transposed and the delta `scale * A @ B` equals PEFT's `(alpha / r) * B @ A`
transposed, weight for weight.

GPT-2's fused `c_attn` (query, key, value side by side along its output):
- load: a rank-r LoRA on `c_attn` is, exactly, rank-r LoRAs on query, key
  and value sharing A, with B cut in three. A rank-R adapter (R > r) loads
  when each piece uses at most r columns of B (as `save_peft_adapter`
  writes): those columns and their rows of A are kept.
- save: our three adapters become one block adapter of rank
  `r * (number of pieces with LoRA)`: A stacks their A's, B is block
  diagonal, and `rank_pattern` / `alpha_pattern` give `c_attn` that rank
  and an alpha keeping PEFT's scale equal to ours; the zero blocks add
  nothing, so PEFT computes the same delta.
What is exact: the A and B values (float32; bfloat16 and float16 files
widen exactly) and so each layer's delta; the scale `alpha / r` is
compared with a relative tolerance of 1e-6 (a block adapter's
`(3 * alpha) / (3 * r)` may differ from `alpha / r` in the last bit).
"""

import math
import os
import re

import keras
import numpy as np

from keras_qlora import atomic
from keras_qlora import surgery
from keras_qlora.adapters import files as adapter_files
from keras_qlora.adapters import named
from keras_qlora.adapters.files import LoadPlan
from keras_qlora.interop import hf_modules
from keras_qlora.interop import names
from keras_qlora.interop import peft_files
from keras_qlora.layers import QLoRALayerBase
from keras_qlora.layers.adapter_slots import DEFAULT_ADAPTER
from keras_qlora.layers.adapter_slots import check_adapter_name

_PIECE_NAMES = ("query", "key", "value")


def load_peft_adapter(
    model,
    path,
    naming: str | None = "hf-bert",
    name: str = DEFAULT_ADAPTER,
    module_prefix: str | None = None,
) -> list:
    """Loads a PEFT LoRA adapter directory into `model` as adapter `name`.

    Every LoRA layer of the model must get weights from the file and every
    LoRA module of the file must have its layer(s); ranks and scales must
    agree (see the module doc for GPT-2's `c_attn`). Everything is checked
    before anything is assigned. A new `name` adds an adapter (inactive:
    see `keras_qlora.set_adapter`); an existing one is overwritten.

    Args:
        model: a `QLoRAModel` from `keras_qlora.apply()` on a keras_hub
            `BertBackbone` (`naming="hf-bert"`) or `GPT2Backbone`
            (`"hf-gpt2"`), with LoRA on the layers the adapter targets and
            the adapter's rank and alpha (and `use_rslora`).
        path: a directory with PEFT's `adapter_config.json` and
            `adapter_model.safetensors`.
        naming: the table mapping our layers to HF module names, or None
            for our layer paths with "/" -> ".".
        name: the adapter to load into.
        module_prefix: what follows `base_model.model.` before the module
            names (`"bert."` for a BertForSequenceClassification adapter);
            None detects it.

    Returns:
        The paths of the layers loaded.

    Raises:
        TypeError: not a `QLoRAModel`; a non-string name.
        FileNotFoundError: the directory or one of its files is missing.
        ValueError: a corrupt file, a bad config field, unknown or missing
            modules, shapes, ranks or scales that do not fit; the message
            names the keys and layers.

    Example:
    >>> model = keras_qlora.apply(bert, rank=8, alpha=16, verbose=False)
    >>> load_peft_adapter(model, "peft_adapter", naming="hf-bert")
    """
    caller = "load_peft_adapter"
    naming = names.get_naming(naming)
    layers = hf_modules.qlora_layers(model, caller, lora_only=True)
    name = check_adapter_name(name)
    modules = hf_modules.group(layers, naming, caller)
    directory = os.path.abspath(os.fspath(path))
    config, pairs = read_adapter(directory)
    root = hf_modules.pick_root(
        naming,
        module_prefix,
        lambda r: sum(r + m in pairs for m in modules),
        caller,
    )
    expected = {root + m: module for m, module in modules.items()}
    extra = sorted(set(pairs) - set(expected))
    missing = sorted(set(expected) - set(pairs))
    if extra or missing:
        raise ValueError(
            f"The PEFT adapter in {directory} does not match the model's "
            f"LoRA layers: modules only in the adapter {extra[:8]}, only in "
            f"the model {missing[:8]}. apply() the model with "
            "target_modules covering exactly the adapter's modules."
        )
    lora = []
    for full, module in expected.items():
        lora += _module_values(full, module, pairs[full], config, layers)
    LoadPlan(model=model, name=name, lora=lora, modules={}).apply()
    return list(layers)


def save_peft_adapter(
    model,
    path,
    naming: str | None = "hf-bert",
    name: str | None = None,
    module_prefix: str = "",
    overwrite: bool = False,
) -> str:
    """Writes one adapter of `model` as a PEFT LoRA adapter directory.

    The directory holds `adapter_config.json` (a `LoraConfig`:
    `r`, `lora_alpha`, `use_rslora`, `target_modules` chosen so that PEFT's
    suffix matching selects exactly our LoRA layers' modules, and, for a
    fused GPT-2 `c_attn`, `rank_pattern` / `alpha_pattern`) and
    `adapter_model.safetensors` (float32). Written atomically.

    Args:
        model: a `QLoRAModel` (keras_hub BERT or GPT-2 backbone).
        path: the directory to create.
        naming: `"hf-bert"`, `"hf-gpt2"`, or None (our layer paths).
        name: the adapter to save; None saves the active one.
        module_prefix: put between `base_model.model.` and the module names:
            `""` for a PEFT model of `BertModel` / `GPT2Model`, `"bert."`
            or `"transformer."` for one of a task model.
        overwrite: replace an existing adapter directory at `path`.

    Returns:
        The absolute path written.

    Raises:
        TypeError: not a `QLoRAModel`.
        FileExistsError: `path` exists and `overwrite` is False.
        ValueError: unknown adapter or naming, LoRA layers without an HF
            name, `modules_to_save` (PEFT would need their HF names too),
            or `path` is something other than an adapter directory.
            `keras_qlora.adapters.NonFiniteError` (a ValueError): weights
            holding NaN or Inf; nothing is written, an existing adapter at
            `path` stays.

    Example:
    >>> save_peft_adapter(model, "peft_adapter", naming="hf-gpt2")
    """
    caller = "save_peft_adapter"
    naming = names.get_naming(naming)
    layers = hf_modules.qlora_layers(model, caller, lora_only=True)
    name = named.active_adapter(model) if name is None else name
    if name not in named.list_adapters(model):
        raise ValueError(
            f"The model has no adapter named {name!r}. Its adapters: "
            f"{named.list_adapters(model)}"
        )
    saved = model.qlora_report.get("modules_to_save") or []
    if saved:
        raise ValueError(
            f"{caller}() writes LoRA weights only, but the model also trains "
            f"modules_to_save {saved}, which have no Hugging Face name here. "
            "Use keras_qlora.save_adapter() to keep them."
        )
    root = hf_modules.check_prefix(module_prefix)
    modules = hf_modules.group(layers, naming, caller)
    tensors, ranks = {}, {}
    for m, module in modules.items():
        lora_a, lora_b = _fused_pair(module, layers, name, root + m)
        tensors[peft_files.lora_key(root + m, "A")] = lora_a
        tensors[peft_files.lora_key(root + m, "B")] = lora_b
        ranks[root + m] = lora_a.shape[0]
    # A diverged adapter is never written (nothing could load it back).
    adapter_files.refuse_non_finite(tensors, name)
    config = _config(model, naming, root, ranks, next(iter(layers.values())))
    target = os.path.abspath(os.fspath(path))
    atomic.check_replaceable(
        target, overwrite, peft_files.CONFIG_FILE, "an adapter directory"
    )
    with atomic.staging_dir(target) as tmp:
        atomic.write_bytes(
            os.path.join(tmp, peft_files.WEIGHTS_FILE),
            peft_files.write_tensors(tensors),
        )
        atomic.write_bytes(
            os.path.join(tmp, peft_files.CONFIG_FILE),
            peft_files.config_json(config),
        )
        atomic.commit_dir(tmp, target, overwrite=overwrite)
    return target


# -- loading ------------------------------------------------------------------


def read_adapter(directory) -> tuple:
    """Reads and checks a PEFT adapter directory.

    Returns:
        `(PeftConfig, {module: {"A": array, "B": array}})`.

    Raises:
        FileNotFoundError / ValueError: as `load_peft_adapter`.
    """
    config, tensors = _read(directory)
    pairs = _pairs(tensors, directory)
    for full, pair in pairs.items():
        _check_pair(full, pair, config)
    return config, pairs


def check_module_shape(full, pair, k, n, pieces, paths):
    """Raises unless the module's A `[r, in]` and B `[out, r]` fit layers
    mapping `[K, N]` (`pieces` of them side by side, named by `paths`)."""
    a, b = pair["A"], pair["B"]
    if a.shape[1] != k or b.shape[0] != n * pieces:
        raise ValueError(
            f"PEFT module '{full}' maps [in={a.shape[1]}] -> "
            f"[out={b.shape[0]}]; the model's layer(s) {paths} map "
            f"[in={k}] -> [out={n * pieces}]."
        )


def _read(directory):
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No PEFT adapter directory at {directory}")
    data = {}
    for file in (peft_files.CONFIG_FILE, peft_files.WEIGHTS_FILE):
        full = os.path.join(directory, file)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"PEFT adapter file missing: {full}")
        with open(full, "rb") as f:
            data[file] = f.read()
    config = peft_files.parse_config(
        data[peft_files.CONFIG_FILE],
        os.path.join(directory, peft_files.CONFIG_FILE),
    )
    tensors = peft_files.read_tensors(
        data[peft_files.WEIGHTS_FILE],
        os.path.join(directory, peft_files.WEIGHTS_FILE),
    )
    return config, tensors


def _pairs(tensors, source):
    """`{module: {"A": array, "B": array}}`; raises on other keys."""
    pairs, unknown = {}, []
    for key, value in tensors.items():
        parsed = peft_files.split_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        module, which = parsed
        pairs.setdefault(module, {})[which] = value
    if unknown:
        raise ValueError(
            f"{source} holds keys that are not LoRA A/B weights "
            f"('{peft_files.KEY_PREFIX}<module>.lora_A.weight' / "
            f"'.lora_B.weight'): {sorted(unknown)[:8]}. modules_to_save, "
            "DoRA magnitudes and LoRA biases cannot be loaded."
        )
    half = sorted(m for m, p in pairs.items() if len(p) != 2)
    if half:
        raise ValueError(
            f"{source}: modules {half[:8]} have lora_A or lora_B but not both."
        )
    return pairs


def _check_pair(full, pair, config):
    """What a module's A and B must be whatever the model: matrices of one
    rank, the config's, with finite values."""
    a, b = pair["A"], pair["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"PEFT module '{full}': lora_A {list(a.shape)} and lora_B "
            f"{list(b.shape)} must be [r, in] and [out, r]."
        )
    config_rank, _ = config.rank_and_alpha(full)
    if a.shape[0] != config_rank:
        raise ValueError(
            f"PEFT module '{full}' has weights of rank {a.shape[0]} but the "
            f"config gives it r={config_rank} (r / rank_pattern)."
        )
    for which, value in (("lora_A", a), ("lora_B", b)):
        if not np.isfinite(value).all():
            raise ValueError(f"PEFT module '{full}': {which} has NaN or Inf.")


def _module_values(full, module, pair, config, layers):
    """`[(layer, "lora_a" | "lora_b", value)]` for one HF module (its pair
    checked by `_check_pair`)."""
    a, b = pair["A"], pair["B"]
    rank = a.shape[0]
    _, alpha = config.rank_and_alpha(full)
    present = sorted(module.layers)
    shapes = {layers[module.layers[p]].kernel_2d_shape for p in present}
    if len(shapes) != 1:
        raise ValueError(
            f"The pieces of '{full}' have different shapes: {sorted(shapes)}"
        )
    k, n = shapes.pop()
    paths = [module.layers[p] for p in present]
    check_module_shape(full, pair, k, n, module.pieces, paths)
    scale = peft_files.lora_scale(alpha, rank, config.use_rslora)
    out = []
    for piece in range(module.pieces):
        b_piece = b[piece * n : (piece + 1) * n]
        if piece not in module.layers:
            if np.any(b_piece != 0):
                raise ValueError(
                    f"PEFT module '{full}' changes its "
                    f"{_PIECE_NAMES[piece]} outputs, but the model has no "
                    f"LoRA on that layer. apply() with LoRA on it too."
                )
            continue
        path = module.layers[piece]
        layer = layers[path]
        a_sel, b_sel = _fit_rank(
            a, b_piece, layer, module, present.index(piece), (full, path)
        )
        _check_scale(full, scale, alpha, rank, config.use_rslora, layer, path)
        out += [(layer, "lora_a", a_sel.T.copy()), (layer, "lora_b", b_sel.T)]
    return out


def _fit_rank(a, b_piece, layer, module, block, where):
    """Rows of A / columns of B for one layer of rank `layer.rank`.

    A module of the layer's rank is used whole (shared A for the pieces of
    a fused module). A fused module of higher rank keeps the columns of B
    this piece uses, filled up with its own block's columns (where
    `save_peft_adapter` puts them); unused columns contribute nothing.
    """
    (full, path), rank, r = where, a.shape[0], layer.rank
    if rank == r:
        return a, b_piece
    used = list(np.flatnonzero(np.any(b_piece != 0, axis=0)))
    if module.pieces > 1 and rank > r and len(used) <= r:
        fill = []
        if rank == r * len(module.layers):
            fill = list(range(block * r, (block + 1) * r))
        for column in fill + list(range(rank)):
            if len(used) == r:
                break
            if column not in used:
                used.append(column)
        used = sorted(used)
        return a[used], b_piece[:, used]
    raise ValueError(
        f"PEFT module '{full}' has rank {rank} (and gives layer "
        f"'{path}' a delta of rank up to {len(used)}); the model's "
        f"LoRA rank is {r}. apply() the model with rank={rank}."
    )


def _check_scale(full, scale, alpha, rank, use_rslora, layer, path):
    if math.isclose(scale, layer.lora_scale, rel_tol=1e-6):
        return
    denom = f"sqrt({rank})" if use_rslora else f"{rank}"
    raise ValueError(
        f"PEFT module '{full}' scales B @ A by lora_alpha / {denom} = "
        f"{alpha:g} / {denom} = {scale:.6g} (use_rslora={use_rslora}); "
        f"layer '{path}' uses {layer.lora_scale:.6g} (alpha="
        f"{layer.lora_alpha:g}, rank={layer.rank}, use_rslora="
        f"{layer.use_rslora}). apply() with the adapter's alpha and "
        "use_rslora."
    )


# -- saving -------------------------------------------------------------------


def _fused_pair(module, layers, name, full):
    """PEFT `(A [R, in], B [out, R])` of one module (see the module doc)."""
    present = sorted(module.layers)
    pieces = [layers[module.layers[p]] for p in present]
    pairs = [
        [v.numpy().astype(np.float32) for v in layer.adapter_variables(name)]
        for layer in pieces
    ]
    if module.pieces == 1:
        lora_a, lora_b = pairs[0]
        return lora_a.T.copy(), lora_b.T.copy()
    shapes = {layer.kernel_2d_shape for layer in pieces}
    if len(shapes) != 1:
        raise ValueError(
            f"The pieces of '{full}' have different shapes: {sorted(shapes)}"
        )
    k, n = shapes.pop()
    r = pieces[0].rank
    a_out = np.zeros((r * len(present), k), np.float32)
    b_out = np.zeros((n * module.pieces, r * len(present)), np.float32)
    for block, (piece, (lora_a, lora_b)) in enumerate(
        zip(present, pairs, strict=True)
    ):
        cols = slice(block * r, (block + 1) * r)
        a_out[cols] = lora_a.T  # (r, K)
        b_out[piece * n : (piece + 1) * n, cols] = lora_b.T  # (N, r)
    return a_out, b_out


def _config(model, naming, root, ranks, layer):
    settings = model.settings
    rank_pattern, alpha_pattern = _patterns(ranks, settings.rank, layer)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": settings.rank,
        "lora_alpha": _tidy(settings.alpha),
        "lora_dropout": settings.dropout,
        "use_rslora": settings.use_rslora,
        "target_modules": _target_modules(model, naming, root, set(ranks)),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": bool(naming is not None and naming.fan_in_fan_out),
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
    }


def _patterns(ranks, rank, layer):
    """`rank_pattern` / `alpha_pattern` for modules whose rank is not
    `rank`: keyed by the module's last name (`c_attn`) when that selects
    modules of one rank only, else by the full name."""
    by_last = {}
    for full, r in ranks.items():
        by_last.setdefault(full.rsplit(".", 1)[-1], set()).add(r)
    rank_pattern = {}
    for full, r in ranks.items():
        if r == rank:
            continue
        last = full.rsplit(".", 1)[-1]
        key = re.escape(last if by_last[last] == {r} else full)
        rank_pattern[key] = r
    denom = math.sqrt if layer.use_rslora else float
    alpha_pattern = {
        key: _tidy(layer.lora_scale * denom(r))
        for key, r in rank_pattern.items()
    }
    return rank_pattern, alpha_pattern


def _target_modules(model, naming, root, targets):
    """Shortest name suffixes that PEFT's matching (`name == t` or
    `name.endswith("." + t)`) maps onto exactly `targets` among the model's
    linear modules."""
    universe = set(targets)
    for entry in surgery.walk(model.base_model):
        linear = (keras.layers.Dense, keras.layers.EinsumDense, QLoRALayerBase)
        if isinstance(entry.layer, linear):
            target = names.target_for(naming, entry.path)
            if target is not None:
                universe.add(root + target.module)
    chosen = set()
    for full in targets:
        parts = full.split(".")
        for start in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[start:])
            hits = {
                u for u in universe if u == suffix or u.endswith(f".{suffix}")
            }
            if hits <= targets:
                chosen.add(suffix)
                break
    return sorted(chosen)


def _tidy(value):
    """An int when the float is integral (`16` rather than `16.0`)."""
    value = float(value)
    return int(value) if value.is_integer() else value
