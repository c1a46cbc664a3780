"""Whole models <-> bitsandbytes state dicts (every QLoRA layer at once).

`to_bitsandbytes_model` writes, for each QLoRA layer, the entries a
bitsandbytes `Linear4bit` saves (see `interop.bitsandbytes`) plus its
float bias, under the layer's Hugging Face module name (`names`);
`from_bitsandbytes_model` reads such a state dict (e.g. the `state_dict()`
of a transformers model loaded with `load_in_4bit`, converted to numpy)
into a model prepared with `keras_qlora.apply()`.

What is exact: the dequantized weights, bit for bit, both ways (bytes are
renamed, never requantized). GPT-2's fused `c_attn` is cut into or joined
from our query/key/value layers (see `fused_state`); a join that cannot
keep double quantization writes float32 block scales instead (still exact).
"""

import warnings
from collections.abc import Mapping

import numpy as np

from keras_qlora.interop import fused_state
from keras_qlora.interop import hf_modules
from keras_qlora.interop import names
from keras_qlora.interop.bitsandbytes import from_bitsandbytes
from keras_qlora.interop.bitsandbytes import tensor_to_numpy
from keras_qlora.interop.bitsandbytes import to_bitsandbytes
from keras_qlora.quantizers import NF4State
from keras_qlora.quantizers import double_quantize_absmax

# Marks the metadata entry of a bitsandbytes 4-bit weight.
_QUANT_STATE = ".quant_state.bitsandbytes__"
# The entries of one bitsandbytes weight, after its module name: 4-bit
# (Linear4bit, NF4 or FP4) or int8 (Linear8bitLt: SCB, weight_format).
_WEIGHT_ENTRIES = (
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
    "weight.quant_state.bitsandbytes__fp4",
    "SCB",
    "weight_format",
)


def to_bitsandbytes_model(
    model, naming: str | None = None, module_prefix: str | None = None
) -> dict:
    """bitsandbytes state_dict entries for every QLoRA layer of `model`.

    Args:
        model: a `QLoRAModel` from `keras_qlora.apply()`.
        naming: `"hf-bert"` / `"hf-gpt2"` for Hugging Face module names
            (keras_hub `BertBackbone` / `GPT2Backbone` layers), or None for
            our layer paths with "/" -> ".".
        module_prefix: put before every module name; None uses the HF task
            model's root (`"bert."`, `"transformer."`) with a naming and
            `""` without one.

    Returns:
        `{key: numpy array}`: per module `<name>.weight` and its
        `.absmax`, `.quant_map`, (`.nested_absmax`, `.nested_quant_map`,)
        `.quant_state.bitsandbytes__nf4` entries, and `<name>.bias` for
        layers with a bias. bitsandbytes' `dequantize_4bit` of each weight
        equals our dequantized kernel transposed (`[out, in]`).

    Raises:
        TypeError: not a `QLoRAModel`.
        ValueError: an unknown naming, a QLoRA layer the naming has no name
            for, or a fused module (GPT-2 `c_attn`) whose query, key and
            value are not all QLoRA layers or cannot be joined exactly.

    Example:
    >>> model = keras_qlora.apply(gpt2_backbone, verbose=False)
    >>> sd = to_bitsandbytes_model(model, naming="hf-gpt2")
    >>> sd["transformer.h.0.attn.c_attn.weight"].dtype
    dtype('uint8')
    """
    caller = "to_bitsandbytes_model"
    naming = names.get_naming(naming)
    layers = hf_modules.qlora_layers(model, caller)
    modules = hf_modules.group(layers, naming, caller)
    if module_prefix is None:
        root = naming.root if naming is not None else ""
    else:
        root = hf_modules.check_prefix(module_prefix)
    out = {}
    for module in modules.values():
        _check_complete(module, caller)
        pieces = [layers[module.layers[p]] for p in range(module.pieces)]
        states = [layer.nf4_state() for layer in pieces]
        what = root + module.name
        state = (
            states[0] if len(states) == 1 else fused_state.join(states, what)
        )
        out.update(to_bitsandbytes(state, prefix=f"{what}.weight"))
        biases = [hf_modules.bias_to_vector(layer) for layer in pieces]
        if any(b is not None for b in biases):
            if any(b is None for b in biases):
                raise ValueError(
                    f"{caller}(): the layers of '{what}' disagree on having "
                    "a bias; a fused module has one bias or none."
                )
            out[f"{what}.bias"] = np.concatenate(biases)
    return out


def from_bitsandbytes_model(
    model,
    state_dict: Mapping,
    naming: str | None = None,
    module_prefix: str | None = None,
    strict: bool = True,
) -> list:
    """Loads bitsandbytes NF4 weights (and biases) into `model`'s layers.

    Everything is read and checked before anything is assigned: on any
    error the model is left as it was.

    Args:
        model: a `QLoRAModel` whose QLoRA layers are the modules to load,
            with the file's block size. Double quantization may differ:
            for a layer with `double_quant=False`, double-quantized block
            scales are expanded to float32 (exactly); for a layer with
            `double_quant=True`, float32 block scales (as bitsandbytes
            writes without `compress_statistics`, and as
            `to_bitsandbytes_model` writes a joined GPT-2 `c_attn`) are
            double quantized, which changes them slightly: a `UserWarning`
            gives the largest relative change.
        state_dict: `{key: numpy array or torch tensor}` as written by
            `to_bitsandbytes_model` or saved by bitsandbytes.
        naming: as in `to_bitsandbytes_model`.
        module_prefix: the prefix of the module names in `state_dict`;
            None detects it (the HF task model's root, or none).
        strict: every key must be used. With False, keys of modules that
            are not QLoRA layers here (embeddings, norms) are ignored, but
            4-bit weights that no layer takes still raise.

    Returns:
        The paths of the layers loaded.

    Raises:
        TypeError: not a `QLoRAModel` or not a mapping.
        ValueError: missing or unknown keys, malformed entries, shapes,
            block size or double quantization that do not fit the layers;
            the message names the keys and layers.

    Example:
    >>> model = keras_qlora.apply(backbone, verbose=False)
    >>> from_bitsandbytes_model(model, state_dict, naming="hf-bert")
    """
    caller = "from_bitsandbytes_model"
    naming = names.get_naming(naming)
    layers = hf_modules.qlora_layers(model, caller)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"{caller}() expects a state_dict mapping. Received: "
            f"{type(state_dict).__name__}"
        )
    modules = hf_modules.group(layers, naming, caller)
    for module in modules.values():
        _check_complete(module, caller)
    root = hf_modules.pick_root(
        naming,
        module_prefix,
        lambda r: sum(f"{r}{m}.weight" in state_dict for m in modules),
        caller,
    )
    missing = [
        key
        for m in modules.values()
        for key in _required_keys(root + m.name, m, layers)
        if key not in state_dict
    ]
    if missing:
        raise ValueError(
            f"{caller}(): the state_dict lacks {len(missing)} key(s) for the "
            f"model's QLoRA layers: {missing[:8]}. Keys present: "
            f"{_preview(state_dict)}"
        )
    assignments = []
    for module in modules.values():
        assignments += _read_module(state_dict, root, module, layers)
    _check_unused(state_dict, root, modules, layers, strict, caller)
    _warn_requantized(assignments, caller)
    for layer, state, _, bias in assignments:
        layer.set_nf4_state(state)
        if bias is not None:
            layer.bias.assign(bias)
    return list(layers)


def _read_module(state_dict, root, module, layers):
    """Reads one module; returns `[(layer, NF4State, (path, scale error)
    or None, bias or None)]`."""
    what = root + module.name
    key = f"{what}.weight"
    state = from_bitsandbytes(state_dict, prefix=key)
    paths = [module.layers[p] for p in range(module.pieces)]
    pieces = [layers[path] for path in paths]
    if not any(layer.double_quant for layer in pieces):
        # Exact: the float32 scales bitsandbytes would compute.
        state = fused_state.expand_scales(state)
    states = (
        [state]
        if module.pieces == 1
        else fused_state.split(state, module.pieces, key)
    )
    biases = [None] * len(pieces)
    if len({layer.bias is None for layer in pieces}) != 1:
        raise ValueError(
            f"The layers {paths} of '{what}' disagree on having a bias; a "
            "fused module has one bias or none."
        )
    if pieces[0].bias is not None:
        total = sum(layer.kernel_2d_shape[1] for layer in pieces)
        vector = _bias(state_dict, f"{what}.bias", total)
        cuts = np.cumsum([layer.kernel_2d_shape[1] for layer in pieces])
        biases = [
            hf_modules.bias_from_vector(layer, part)
            for layer, part in zip(
                pieces, np.split(vector, cuts[:-1]), strict=True
            )
        ]
    return [
        (layer, *_fit(layer, s, path, key), bias)
        for layer, s, path, bias in zip(
            pieces, states, paths, biases, strict=True
        )
    ]


def _fit(layer, state, path, key):
    """Checks a state against the layer; expands or double-quantizes its
    block scales to the layer's storage. Returns `(state, note)`, `note`
    being `(path, largest relative scale change)` when it requantized."""
    k, n = layer.kernel_2d_shape
    if state.shape != (k, n):
        got = [state.shape[1], state.shape[0]]
        raise ValueError(
            f"'{key}' holds a weight [out, in] = {got}; layer '{path}' "
            f"needs [out, in] = {[n, k]}."
        )
    if state.quant_type != layer.quant_type:
        raise ValueError(
            f"'{key}' holds a {state.quant_type} weight; layer '{path}' is "
            f"{layer.quant_type}. apply() the model with "
            f"quant_type={state.quant_type!r}."
        )
    if state.block_size != layer.state_block_size:
        raise ValueError(
            f"'{key}' uses block size {state.block_size}; layer '{path}' "
            f"uses {layer.block_size}. apply() the model with "
            f"block_size={state.block_size}."
        )
    if layer.double_quant and not state.double_quant:
        return _double_quantized(state, path)
    if not layer.double_quant:
        state = fused_state.expand_scales(state)
    return state, None


def _double_quantized(state, path):
    """`state` with its float32 block scales double quantized."""
    codes, scale, offset = double_quantize_absmax(state.absmax)
    new = NF4State(
        packed=state.packed,
        absmax=codes,
        shape=state.shape,
        block_size=state.block_size,
        absmax_scale=scale,
        absmax_offset=offset,
        quant_type=state.quant_type,
    )
    change = np.abs(new.block_absmax() - state.absmax).max()
    return new, (path, float(change / max(np.abs(state.absmax).max(), 1e-30)))


def _warn_requantized(assignments, caller):
    notes = [note for _, _, note, _ in assignments if note is not None]
    if notes:
        path, worst = max(notes, key=lambda n: n[1])
        warnings.warn(
            f"{caller}(): {len(notes)} weight(s) had float32 block scales "
            "and were double quantized to fit the model's double_quant=True "
            "layers (the 4-bit codes are unchanged; each block scale moved "
            f"by at most {worst:.2e} of the largest, at layer '{path}'). "
            "apply() with double_quant=False keeps them exact.",
            UserWarning,
            stacklevel=3,
        )


def _bias(state_dict, key, size):
    value = state_dict[key]
    if str(getattr(value, "dtype", "")) == "torch.bfloat16":
        # numpy has no bfloat16; widening to float32 is exact.
        value = value.float()
    value = tensor_to_numpy(value, key)
    if value.shape != (size,) or not np.issubdtype(value.dtype, np.floating):
        raise ValueError(
            f"'{key}' must be a float vector of shape [{size}]. Received: "
            f"shape={list(value.shape)}, dtype={value.dtype}"
        )
    value = value.astype(np.float32)
    if not np.isfinite(value).all():
        raise ValueError(f"'{key}' holds NaN or Inf values.")
    return value


def _required_keys(what, module, layers):
    keys = [f"{what}.weight"]
    if layers[module.layers[0]].bias is not None:
        keys.append(f"{what}.bias")
    return keys


def _check_complete(module, caller):
    missing = module.missing_pieces()
    if missing:
        have = sorted(module.layers.values())
        raise ValueError(
            f"{caller}(): HF module '{module.name}' is one weight for "
            f"{module.pieces} of our layers (query, key, value), but only "
            f"{have} are QLoRA layers here; pieces {missing} are missing. "
            "Quantize all of them (quantize_modules) to convert it."
        )


def _check_unused(state_dict, root, modules, layers, strict, caller):
    """Keys nothing consumed: under a loaded module, a 4-bit weight, or
    (strict) anything."""
    used = set()
    for module in modules.values():
        what = root + module.name
        used.update(f"{what}.{entry}" for entry in _WEIGHT_ENTRIES)
        if layers[module.layers[0]].bias is not None:
            used.add(f"{what}.bias")
    prefixes = tuple(f"{root}{m}." for m in modules)
    unused = [k for k in state_dict if k not in used]
    bad = [
        k
        for k in unused
        if strict or str(k).startswith(prefixes) or _QUANT_STATE in str(k)
    ]
    if bad:
        why = (
            "Pass strict=False to ignore float entries of other modules."
            if strict
            else "They are 4-bit weights or entries of the loaded modules."
        )
        raise ValueError(
            f"{caller}(): {len(bad)} key(s) match no QLoRA layer of the "
            f"model: {sorted(map(str, bad))[:8]}. {why}"
        )


def _preview(state_dict, limit=8):
    keys = sorted(map(str, state_dict))
    more = f" ... ({len(keys)} in all)" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"
