"""`apply_peft_adapter`: a float model plus a PEFT adapter, in one call.

The adapter says where LoRA goes (`target_modules`, or the modules its
weights hold), with which rank and scale (`r`, `lora_alpha`,
`use_rslora`, `rank_pattern`, `alpha_pattern`): this applies keras_qlora
with exactly that layout and loads the weights. keras_qlora gives every
LoRA layer one rank and alpha, so an adapter whose modules differ in rank
or scale is refused, naming them.
"""

import math
import os

import keras
import numpy as np

from keras_qlora import convert
from keras_qlora import rewrite
from keras_qlora import surgery
from keras_qlora.interop import hf_modules
from keras_qlora.interop import names
from keras_qlora.interop import peft
from keras_qlora.layers import plan_einsum
from keras_qlora.layers.adapter_slots import DEFAULT_ADAPTER
from keras_qlora.selectors import exact_paths

# apply() arguments that the adapter decides.
_FROM_ADAPTER = ("rank", "alpha", "use_rslora", "target_modules")


def apply_peft_adapter(
    model,
    path,
    naming: str | None = "hf-bert",
    module_prefix: str | None = None,
    name: str = DEFAULT_ADAPTER,
    **apply_kwargs,
):
    """Applies keras_qlora to float `model` as a PEFT adapter lays LoRA out,
    and loads the adapter.

    Args:
        model: a built float keras_hub `BertBackbone` (`naming="hf-bert"`)
            or `GPT2Backbone` (`"hf-gpt2"`), or any model with
            `naming=None`.
        path: a PEFT LoRA adapter directory.
        naming, module_prefix, name: as in `load_peft_adapter`.
        **apply_kwargs: the other `keras_qlora.apply()` arguments
            (`quantize_modules`, `block_size`, training options, ...); the
            adapter decides `rank`, `alpha`, `use_rslora` and
            `target_modules`.

    Returns:
        The `QLoRAModel`, with the adapter loaded as `name` (active when it
        is "default").

    Raises:
        TypeError: an `apply()` argument the adapter decides.
        FileNotFoundError / ValueError: as `load_peft_adapter`; a module of
            the adapter with no layer in `model`; modules of different
            ranks or scales (keras_qlora uses one rank and alpha per
            model). Nothing is changed then.

    Example:
    >>> model = apply_peft_adapter(                        # doctest: +SKIP
    ...     gpt2_backbone, "peft_adapter", naming="hf-gpt2",
    ...     quantize_modules="all-linear")
    """
    caller = "apply_peft_adapter"
    given = sorted(set(apply_kwargs) & set(_FROM_ADAPTER))
    if given:
        raise TypeError(
            f"keras_qlora.interop.{caller}() takes {given} from the "
            "adapter's config; do not pass them."
        )
    spelled = naming
    naming = names.get_naming(naming)
    directory = os.path.abspath(os.fspath(path))
    config, pairs = peft.read_adapter(directory)
    modules, shapes = _linear_modules(model, naming)
    root = hf_modules.pick_root(
        naming,
        module_prefix,
        lambda r: sum(r + m in pairs for m in modules),
        caller,
    )
    layouts, targets = {}, []
    for full, pair in sorted(pairs.items()):
        module = (
            modules.get(full[len(root) :]) if full.startswith(root) else None
        )
        if module is None:
            raise ValueError(
                f"PEFT module '{full}' in {directory} has no linear layer in "
                f"model '{model.name}' (naming={spelled!r}, module "
                f"prefix {root!r}). Its modules are: "
                f"{sorted(root + m for m in modules)[:12]}"
            )
        # Checked before apply() edits the model (read_adapter checked
        # what does not depend on it).
        _check_shape(full, pair, module, shapes)
        lora = _pieces_with_lora(module, pair["B"])
        rank = _layer_rank(pair, module, lora)
        r, alpha = config.rank_and_alpha(full)
        scale = alpha / (math.sqrt(r) if config.use_rslora else r)
        layouts[full] = (rank, scale)
        targets += [module.layers[p] for p in lora]
    if len(set(layouts.values())) > 1:
        shown = {m: {"rank": r, "scale": s} for m, (r, s) in layouts.items()}
        raise ValueError(
            f"The PEFT adapter in {directory} gives its modules different "
            f"ranks or scales: {shown}. keras_qlora applies one rank and "
            "alpha to every LoRA layer, so it cannot hold this adapter as "
            "it is."
        )
    rank, scale = next(iter(layouts.values()))
    alpha = scale * (math.sqrt(rank) if config.use_rslora else rank)
    qlora = rewrite.apply(
        model,
        rank=rank,
        alpha=alpha,
        use_rslora=config.use_rslora,
        target_modules=exact_paths(targets),
        **apply_kwargs,
    )
    peft.load_peft_adapter(qlora, directory, spelled, name, root)
    return qlora


def _linear_modules(model, naming) -> tuple:
    """`({HF module name: hf_modules.Module}, {path: (K, N)})` of the
    model's float linear layers (layers without an HF name are left out);
    `(K, N)` is the 2-D view a QLoRA layer of it would have."""
    modules, shapes = {}, {}
    for entry in surgery.walk(model):
        if not convert.convertible(entry.layer):
            continue
        target = names.target_for(naming, entry.path)
        if target is None:
            continue
        module = modules.setdefault(
            target.module, hf_modules.Module(target.module, target.pieces)
        )
        module.layers[target.piece] = entry.path
        shapes[entry.path] = _kernel_2d_shape(entry.layer)
    return modules, shapes


def _kernel_2d_shape(layer) -> tuple:
    kernel_shape = tuple(int(d) for d in layer.kernel.shape)
    if isinstance(layer, keras.layers.EinsumDense):
        plan = plan_einsum(layer.equation, kernel_shape)
        return plan.k, plan.n
    return kernel_shape


def _check_shape(full, pair, module, shapes):
    paths = [module.layers[p] for p in sorted(module.layers)]
    found = {shapes[p] for p in paths}
    if len(found) != 1:
        raise ValueError(
            f"The pieces of '{full}' have different shapes: {sorted(found)}"
        )
    k, n = found.pop()
    peft.check_module_shape(full, pair, k, n, module.pieces, paths)


def _pieces_with_lora(module, b) -> list:
    """The pieces of `module` the adapter changes (all of an unfused one;
    of a fused one, those whose rows of B are not all zero, or all when
    none is)."""
    if module.pieces == 1:
        return [0]
    n = b.shape[0] // module.pieces
    changed = [p for p in module.layers if np.any(b[p * n : (p + 1) * n] != 0)]
    return sorted(changed or module.layers)


def _layer_rank(pair, module, lora) -> int:
    """The rank each of our layers needs for this module: the module's,
    or, for a block adapter as `save_peft_adapter` writes (each piece in
    its own columns), the rank of one block."""
    a, b = pair["A"], pair["B"]
    rank = a.shape[0]
    if module.pieces == 1 or rank % len(lora):
        return rank
    block = rank // len(lora)
    n = b.shape[0] // module.pieces
    for i, p in enumerate(lora):
        used = np.flatnonzero(np.any(b[p * n : (p + 1) * n] != 0, axis=0))
        if np.any((used < i * block) | (used >= (i + 1) * block)):
            return rank
    return block
