"""A model's QLoRA layers grouped by the Hugging Face module they map to.

Shared by the bitsandbytes and PEFT converters: which layers make up each
HF module (several for GPT-2's fused `c_attn`), which layers have no HF
name, which root (`bert.` or none) a checkpoint uses, and biases in the
HF order (the 2-D view's output order).
"""

import dataclasses

import numpy as np

from keras_qlora.interop import names
from keras_qlora.wrapper import require_qlora_model


@dataclasses.dataclass
class Module:
    """One HF module: `name` (without root) and its layers by piece."""

    name: str
    pieces: int
    layers: dict = dataclasses.field(default_factory=dict)  # piece -> path

    def missing_pieces(self) -> list:
        return [p for p in range(self.pieces) if p not in self.layers]


def qlora_layers(model, caller, lora_only=False) -> dict:
    """`{path: layer}` of a `QLoRAModel`'s QLoRA layers; checks the model.

    Raises:
        TypeError: `model` is not a `QLoRAModel`.
        ValueError: it has no (LoRA) QLoRA layers.
    """
    require_qlora_model(model, f"interop.{caller}")
    layers = model.qlora_layers(lora_only=lora_only)
    if not layers:
        what = "LoRA layers" if lora_only else "QLoRA layers"
        raise ValueError(
            f"keras_qlora.interop.{caller}(): model '{model.name}' has no "
            f"{what}."
        )
    return layers


def group(layers: dict, naming, caller: str) -> dict:
    """`{module name: Module}` for `{path: layer}`, in the layers' order.

    Raises:
        ValueError: a layer has no HF name under `naming`, or two layers map
            to the same module piece.
    """
    unmapped = []
    modules = {}
    for path in layers:
        target = names.target_for(naming, path)
        if target is None:
            unmapped.append(path)
            continue
        module = modules.setdefault(
            target.module, Module(target.module, target.pieces)
        )
        if target.piece in module.layers:
            raise ValueError(
                f"keras_qlora.interop.{caller}(): layers "
                f"'{module.layers[target.piece]}' and '{path}' both map to "
                f"piece {target.piece} of HF module '{target.module}'."
            )
        module.layers[target.piece] = path
    if unmapped:
        kinds = [r.path.replace(names.BLOCK_INDEX, "{i}") for r in naming.rules]
        raise ValueError(
            f"keras_qlora.interop.{caller}(): naming={naming.name!r} has no "
            f"Hugging Face name for layers {unmapped[:8]}. Mapped layer "
            f"kinds: {kinds}. Use naming=None (our "
            "layer paths) or leave those layers out of apply()."
        )
    return modules


def pick_root(naming, module_prefix, candidates_present, caller) -> str:
    """The root to put before HF module names in a checkpoint.

    Args:
        naming: a `names.Naming` or None.
        module_prefix: the caller's choice; None detects it.
        candidates_present: `root -> number of expected keys present`.
        caller: the public function, for messages.

    Raises:
        ValueError: a bad `module_prefix`, or no root under which any
            expected key is present.
    """
    if module_prefix is not None:
        return check_prefix(module_prefix)
    roots = names.module_roots(naming)
    counts = {root: candidates_present(root) for root in roots}
    best = max(roots, key=lambda root: counts[root])
    if counts[best] == 0:
        raise ValueError(
            f"keras_qlora.interop.{caller}(): no key of the model's modules "
            f"was found under the module prefixes {list(roots)}. Pass "
            "module_prefix= to name the prefix the file uses."
        )
    return best


def check_prefix(module_prefix) -> str:
    if not isinstance(module_prefix, str) or (
        module_prefix and not module_prefix.endswith(".")
    ):
        raise ValueError(
            "module_prefix must be a string ending in '.' (e.g. 'bert.') or "
            f"''. Received: module_prefix={module_prefix!r}"
        )
    return module_prefix


# -- biases in HF order -------------------------------------------------------


def bias_to_vector(layer) -> np.ndarray | None:
    """The layer's bias as the HF `[N]` vector (2-D view output order)."""
    if layer.bias is None:
        return None
    value = np.asarray(layer.bias.numpy(), dtype=np.float32)
    order = _bias_order(layer)
    if order is None:
        return value.reshape(-1)
    letters, dims, perm_to_free, _ = order
    return np.transpose(value.reshape(dims), perm_to_free).reshape(-1)


def bias_from_vector(layer, vector: np.ndarray) -> np.ndarray:
    """An HF `[N]` bias vector in the shape of the layer's bias variable."""
    order = _bias_order(layer)
    shape = tuple(layer.bias.shape)
    if order is None:
        return vector.reshape(shape)
    _, dims, perm_to_free, free_dims = order
    inverse = np.argsort(perm_to_free)
    return np.transpose(vector.reshape(free_dims), inverse).reshape(shape)


def _bias_order(layer):
    """For an EinsumDense bias: its letters, dims, the permutation to the
    kernel's free-axis order, and the free dims; None for a Dense."""
    plan = getattr(layer, "plan", None)
    if plan is None:
        return None
    kernel_spec = plan.equation.split(",")[1].split("->")[0]
    ordered = [kernel_spec[i] for i in plan.kernel_perm]
    free = ordered[len(ordered) - len(plan.free_shape) :]
    size = dict(zip(free, plan.free_shape, strict=True))
    biased = set(layer.bias_axes or "")
    if biased != set(free):
        raise ValueError(
            f"Layer '{layer.name}' has a bias over axes "
            f"'{layer.bias_axes}' but its outputs are '{''.join(free)}'; "
            "only a bias over every output axis is a Linear bias."
        )
    letters = [c for c in plan.output_spec if c in biased]
    dims = [size[c] for c in letters]
    perm_to_free = [letters.index(c) for c in free]
    return letters, dims, perm_to_free, [size[c] for c in free]
