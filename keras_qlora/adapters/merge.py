"""Merging a LoRA adapter into the base weights, and undoing it.

Two kinds of merge:

- Float merge, `merge(model)`: every QLoRA layer is replaced by the stock
  Keras layer it was made from (`Dense` / `EinsumDense`, same name, config,
  dtype policy and bias) whose kernel is `dequant(W_nf4) + scale * A @ B`,
  computed in float32 (stored in the layer's variable dtype, float32 unless
  its dtype policy says otherwise). The result is the plain base model: it
  saves, loads and exports without keras_qlora. This edits the model in
  place (as PEFT's `merge_and_unload`): the `QLoRAModel` is retired and
  refuses any later use. The float kernels take 32 / 4.127 = 7.75x the
  bytes of the NF4 state they replace.
- Requantize merge, `merge(model, requantize=True)`: the model stays a
  `QLoRAModel` with NF4 layers, but each LoRA layer's weight becomes
  `NF4(dequant(W_nf4) + scale * A @ B)` and the adapter's `B` is zeroed, so
  the adapter adds nothing (and can be trained again from there). NF4
  cannot hold the sum exactly: a `UserWarning` reports the measured error.
  The previous NF4 bytes and `B` are kept (host memory, about the size of
  the NF4 state) so that `unmerge` restores them bit for bit.

Example:
>>> plain = keras_qlora.merge(model)       # keras.Model, no keras_qlora
>>> plain.save("merged.keras")
>>> keras_qlora.merge(other, requantize=True)   # warns with the error
>>> keras_qlora.unmerge(other)                  # exact undo
"""

import dataclasses
import hashlib
import warnings

import keras
import numpy as np
from keras import ops

from keras_qlora import internals
from keras_qlora import surgery
from keras_qlora.adapters import named
from keras_qlora.layers import QLoRADense
from keras_qlora.layers import QLoRAEinsumDense
from keras_qlora.layers import QLoRALayerBase
from keras_qlora.layers.adapter_slots import check_adapter_name
from keras_qlora.layers.paths import adopt_parent_path
from keras_qlora.quantizers import NF4State
from keras_qlora.quantizers import dequantize
from keras_qlora.remat import disable_gradient_checkpointing
from keras_qlora.wrapper import require_qlora_model

# Instance attributes of a QLoRAModel (set with object.__setattr__ so that
# Keras does not track them): the bookkeeping of a requantize merge, and
# the name of the plain model a float merge turned it into.
_RECORD = "_qlora_merge_record"
_RETIRED = "_qlora_merged_into"


@dataclasses.dataclass
class _LayerRecord:
    """What `unmerge` needs for one layer: its previous NF4 state and
    `lora_b`, and a digest of the merged state to detect later changes."""

    layer: QLoRALayerBase
    state: NF4State
    lora_b: np.ndarray
    digest: str


@dataclasses.dataclass
class _MergeRecord:
    adapter: str
    layers: dict


def merge(
    model,
    adapter: str | None = None,
    safe: bool = True,
    requantize: bool = False,
) -> keras.Model:
    """Merges a LoRA adapter into the base weights (see the module doc).

    Float merge (default) edits `model` in place and returns
    `model.base_model` (the same object) with stock `Dense` / `EinsumDense`
    layers. Memory: float32 kernels take 32 / 4.127 = 7.75x the bytes of
    the NF4 state they replace; with `safe=True` all of them exist, with
    the NF4 state, before the first layer is swapped. The `QLoRAModel` is
    unusable afterwards: calling, predicting, fitting or saving it, and
    the adapter functions, raise a `RuntimeError`; `merge` / `unmerge`
    raise a `ValueError`. Other adapters than the merged one are dropped.
    `modules_to_save` layers keep their trained values (those of the
    merged adapter). Variables keep the trainable flags `apply()` gave
    them: merged kernels are frozen, like the rest of the base weights. A
    float merge cannot be undone (no 4-bit state is kept).

    With `requantize=True` the model stays a `QLoRAModel`: each LoRA
    layer's NF4 weight becomes the requantized `W + scale * A @ B` (with
    the model's block size, double quantization and scale search) and the
    adapter's `lora_b` is zeroed. Layers without LoRA and `modules_to_save`
    are not touched. Warns (`UserWarning`) with the relative Frobenius
    error of the requantized weights against the exact float merge.
    `unmerge(model)` undoes it exactly; until then the model refuses
    another merge.

    Args:
        model: a `QLoRAModel` from `keras_qlora.apply()`.
        adapter: the adapter to merge; None merges the active one.
        safe: compute and check every merged kernel for NaN/Inf before
            changing anything (peak memory: all float kernels plus the NF4
            state). False replaces layer by layer without the check. With
            `requantize=True` the check always runs: NF4 cannot store
            NaN/Inf.
        requantize: fold the adapter into the 4-bit weights instead.

    Returns:
        The plain base model (float merge), or `model` (requantize).

    Raises:
        TypeError: `model` is not a `QLoRAModel`; non-bool `safe` or
            `requantize`; a non-string `adapter`.
        ValueError: an unknown adapter; `adapter=None` while adapters are
            disabled; `requantize=True` on a model without LoRA; a model
            already merged; a merged kernel with NaN/Inf (naming the layer;
            the model is left unchanged).

    Example:
    >>> model = keras_qlora.apply(backbone, rank=8)
    >>> model.fit(...)
    >>> plain = keras_qlora.merge(model)
    >>> plain.save("merged.keras")   # loads without keras_qlora
    """
    _check_bool(safe, "safe")
    _check_bool(requantize, "requantize")
    _check_model(model, "merge")
    record = vars(model).get(_RECORD)
    if record is not None:
        raise ValueError(
            f"Model '{model.name}' already holds adapter {record.adapter!r} "
            "merged with requantize=True. Call keras_qlora.unmerge(model) "
            "first; merging again would compound the requantization error "
            "and lose the exact undo."
        )
    entries = [
        e
        for e in surgery.walk(model.base_model)
        if isinstance(e.layer, QLoRALayerBase)
    ]
    adapter = _resolve_adapter(model, adapter, entries, requantize)
    if requantize:
        return _requantize_merge(model, entries, adapter)
    return _float_merge(model, entries, adapter, safe)


def unmerge(model, force: bool = False) -> keras.Model:
    """Undoes `merge(model, requantize=True)` exactly.

    Restores every merged layer's previous NF4 bytes and the adapter's
    `lora_b`, bit for bit, from the bookkeeping `merge` kept on the model
    object. That bookkeeping is not saved with the model: a model loaded
    from a file (or never merged) has nothing to undo. A float merge cannot
    be undone: its plain model carries no 4-bit state or adapter.

    Args:
        model: a `QLoRAModel` merged with `requantize=True`.
        force: restore even if the merged layers changed since the merge
            (e.g. the zeroed adapter was trained), discarding those changes.

    Returns:
        `model`.

    Raises:
        TypeError: `model` is not a `QLoRAModel`.
        ValueError: nothing to undo; a float-merged model; a merged layer
            that was replaced, lost the adapter, or (without `force`)
            changed since the merge. Nothing is restored then.

    Example:
    >>> keras_qlora.merge(model, requantize=True)
    >>> keras_qlora.unmerge(model)
    """
    _check_bool(force, "force")
    _check_model(model, "unmerge")
    record = vars(model).get(_RECORD)
    if record is None:
        raise ValueError(
            f"keras_qlora.unmerge(): model '{model.name}' has nothing to "
            "undo: it holds no merge(requantize=True) bookkeeping. That "
            "bookkeeping lives on the model object only, so a model loaded "
            "from a file cannot be unmerged."
        )
    current = model.qlora_layers()
    for path, item in record.layers.items():
        _check_unchanged(path, item, current.get(path), record.adapter, force)
    for item in record.layers.values():
        item.layer.set_nf4_state(item.state)
        item.layer.adapter_variables(record.adapter)[1].assign(item.lora_b)
    object.__delattr__(model, _RECORD)
    _reset_compiled_functions(model)
    return model


# -- float merge --------------------------------------------------------------


def _float_merge(model, entries, adapter, safe):
    for entry in entries:
        _check_convertible(entry)
    kernels = None
    if safe:
        # Everything is computed and checked before the model changes; the
        # kernels are kept (they are the result anyway), not recomputed.
        kernels = [_merged_kernel(e, adapter) for e in entries]
        for entry, kernel in zip(entries, kernels, strict=True):
            _check_finite(kernel, entry.path, adapter)
    heads = {}
    if adapter is not None and adapter != named.active_adapter(model):
        # The modules_to_save values that belong to the merged adapter.
        heads = named.module_values(model, adapter)
    base = model.base_model
    for i, entry in enumerate(entries):
        if kernels is None:
            kernel = _merged_kernel(entry, adapter)
        else:
            kernel, kernels[i] = kernels[i], None  # free as we go
        surgery.replace(entry, _stock_layer(entry.layer, kernel))
        del kernel
    variables = named.module_variables(model) if heads else {}
    for key, variable in variables.items():
        variable.assign(heads[key])
    # The plain model must not call back into keras_qlora.
    disable_gradient_checkpointing(base)
    _reset_compiled_functions(base)
    _retire(model, base)
    return base


def _merged_kernel(entry, adapter):
    """`dequant(W) + scale * A @ B` as float32 `[K, N]` (numpy)."""
    layer = entry.layer
    kernel = dequantize(layer.nf4_state())
    if adapter is not None and layer.has_lora:
        lora_a, lora_b = layer.adapter_variables(adapter)
        delta = lora_a.numpy() @ lora_b.numpy()  # (K, r) @ (r, N)
        kernel += np.float32(layer.lora_scale) * delta
    return kernel


def _stock_layer(layer, kernel_2d):
    """The built Keras layer `layer` was made from, with `kernel_2d`."""
    common = dict(
        activation=layer.activation, name=layer.name, dtype=layer.dtype_policy
    )
    if isinstance(layer, QLoRAEinsumDense):
        output_shape, input_shape = _einsum_shapes(layer)
        new = keras.layers.EinsumDense(
            layer.equation, output_shape, bias_axes=layer.bias_axes, **common
        )
        adopt_parent_path(new, layer)
        called = _called_input_shape(layer)
        new.build(called or input_shape)
        if called is None and layer.plan.ellipsis:
            # The rank under `...` is unknown; like the QLoRA layer, accept
            # any (its parent layer rebuilds it when a model is loaded).
            new.input_spec = None
        kernel = ops.convert_to_numpy(layer.plan.kernel_from_2d(kernel_2d))
    else:
        new = keras.layers.Dense(layer.units, use_bias=layer.use_bias, **common)
        adopt_parent_path(new, layer)
        new.build((None, layer.kernel_2d_shape[0]))
        kernel = kernel_2d
    new.kernel.assign(kernel)
    new.kernel.trainable = False
    if layer.bias is not None:
        new.bias.assign(np.reshape(layer.bias.numpy(), new.bias.shape))
        new.bias.trainable = layer.bias.trainable
    return new


def _einsum_shapes(layer):
    """`(output_shape, input_shape)` that rebuild the layer's EinsumDense.

    Keras' `output_shape` leaves out the first output axis (the batch) and
    the `...` axes; axes that come from the input are None.
    """
    plan = layer.plan
    lhs, out = plan.equation.replace(" ", "").replace("...", "").split("->")
    inp, ker = lhs.split(",")
    sizes = dict(zip(ker, plan.kernel_shape, strict=True))
    letters = out if plan.ellipsis else out[1:]
    output_shape = tuple(sizes.get(c) for c in letters)
    input_shape = ((None,) if plan.ellipsis else ()) + tuple(
        sizes.get(c) for c in inp
    )
    return output_shape, input_shape


def _called_input_shape(layer):
    """The input shape a layer of a Functional graph is called with."""
    nodes = internals.inbound_nodes(layer)
    tensors = nodes[0].input_tensors if nodes else []
    return tuple(tensors[0].shape) if len(tensors) == 1 else None


def _check_convertible(entry):
    """Refuses (before any change) a layer that cannot go back to Keras."""
    layer = entry.layer
    if isinstance(layer, QLoRADense):
        return
    if not isinstance(layer, QLoRAEinsumDense):
        raise TypeError(
            f"keras_qlora.merge(): layer '{entry.path}' is a "
            f"{type(layer).__name__}; only QLoRADense and QLoRAEinsumDense "
            "can be merged into stock Keras layers."
        )
    output_shape, input_shape = _einsum_shapes(layer)
    kernel_shape, bias_shape, *_ = internals.analyze_einsum_string(
        layer.equation,
        layer.bias_axes,
        _called_input_shape(layer) or input_shape,
        output_shape,
    )
    want_bias = None if layer.bias is None else tuple(layer.bias.shape)
    got_bias = None if bias_shape is None else tuple(bias_shape)
    if tuple(kernel_shape) != layer.kernel_shape or got_bias != want_bias:
        raise ValueError(
            f"keras_qlora.merge(): layer '{entry.path}' (equation "
            f"'{layer.equation}') cannot be rebuilt as a keras EinsumDense: "
            f"it would get kernel {tuple(kernel_shape)} and bias {got_bias}, "
            f"but holds kernel {layer.kernel_shape} and bias {want_bias}."
        )


def _retire(model, plain):
    """Makes every later use of a float-merged QLoRAModel fail clearly."""
    message = (
        f"QLoRAModel '{model.name}' was merged into the plain model "
        f"'{plain.name}' by keras_qlora.merge() and can no longer be used. "
        "Use the model merge() returned, or keras_qlora.apply() a fresh "
        "float model."
    )

    def refuse(*args, **kwargs):
        raise RuntimeError(message)

    # Instance attributes shadow the class methods that everything goes
    # through: `call` (calling, predict, fit, evaluate) and `qlora_layers`
    # (saving, summary(), adapter functions, the training step).
    object.__setattr__(model, "call", refuse)
    object.__setattr__(model, "qlora_layers", refuse)
    object.__setattr__(model, _RETIRED, plain.name)
    _reset_compiled_functions(model)


# -- requantize merge -------------------------------------------------------


def _requantize_merge(model, entries, adapter):
    scale_search = model.settings.scale_search
    staged, errors = [], []
    for entry in (e for e in entries if e.layer.has_lora):
        layer = entry.layer
        state = layer.nf4_state()
        kernel = _merged_kernel(entry, adapter)
        _check_finite(kernel, entry.path, adapter)
        new = layer.quantize_matrix(kernel, scale_search)
        errors.append((entry.path, _relative_error(new, kernel)))
        lora_b = layer.adapter_variables(adapter)[1].numpy()
        staged.append((entry, state, new, lora_b))
        del kernel
    # Everything computed and checked: from here on the model changes.
    layers = {}
    for entry, state, new, lora_b in staged:
        layer = entry.layer
        layer.set_nf4_state(new)
        layer.adapter_variables(adapter)[1].assign(np.zeros_like(lora_b))
        layers[entry.path] = _LayerRecord(
            layer, state, lora_b, _digest(layer, adapter)
        )
    object.__setattr__(model, _RECORD, _MergeRecord(adapter, layers))
    _reset_compiled_functions(model)
    warnings.warn(_error_message(adapter, errors), UserWarning, stacklevel=3)
    return model


def _relative_error(state, kernel):
    """`||dequant(state) - kernel||_F / ||kernel||_F`, in float64."""
    exact = kernel.astype(np.float64)
    diff = dequantize(state).astype(np.float64) - exact
    norm = np.linalg.norm(exact)
    if norm == 0.0:
        return 0.0 if not diff.any() else float("inf")
    return float(np.linalg.norm(diff) / norm)


def _error_message(adapter, errors):
    worst_path, worst = max(errors, key=lambda item: item[1])
    mean = float(np.mean([err for _, err in errors]))
    return (
        f"keras_qlora.merge(requantize=True) folded adapter {adapter!r} "
        f"into the NF4 weights of {len(errors)} layers, which is lossy. "
        "Relative Frobenius error of the requantized weights vs the exact "
        f"float merge: mean {mean:.3g}, worst {worst:.3g} (layer "
        f"'{worst_path}'). keras_qlora.unmerge(model) restores the previous "
        "weights exactly."
    )


def _digest(layer, adapter):
    """sha256 of a layer's NF4 state and the adapter's LoRA values."""
    h = hashlib.sha256()
    state = layer.nf4_state()
    parts = [state.packed, state.absmax]
    if state.double_quant:
        parts += [state.absmax_scale, np.float32(state.absmax_offset)]
    parts += [v.numpy() for v in layer.adapter_variables(adapter)]
    for part in parts:
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def _check_unchanged(path, item, layer, adapter, force):
    if layer is not item.layer:
        raise ValueError(
            f"keras_qlora.unmerge(): layer '{path}' was replaced or removed "
            "since merge(requantize=True); nothing was restored."
        )
    if adapter not in layer.adapter_names:
        raise ValueError(
            f"keras_qlora.unmerge(): layer '{path}' no longer has the merged "
            f"adapter {adapter!r} (its adapters: {list(layer.adapter_names)})"
            "; nothing was restored."
        )
    if not force and _digest(layer, adapter) != item.digest:
        raise ValueError(
            f"keras_qlora.unmerge(): layer '{path}' changed since "
            f"merge(requantize=True) (its NF4 weight or adapter {adapter!r}, "
            "e.g. by training); unmerging would discard those changes, so "
            "nothing was restored. Pass force=True to restore anyway."
        )


# -- shared checks ------------------------------------------------------------


def _check_model(model, caller):
    require_qlora_model(model, caller)
    plain = vars(model).get(_RETIRED)
    if plain is not None:
        raise ValueError(
            f"keras_qlora.{caller}(): QLoRAModel '{model.name}' was already "
            f"merged into the plain model '{plain}' by keras_qlora.merge(). "
            "A float merge keeps no 4-bit state or adapter, so it can be "
            "neither merged again nor unmerged; apply() a fresh float model."
        )


def _resolve_adapter(model, adapter, entries, requantize):
    """The adapter to merge (None: the model has no LoRA), checked."""
    if not any(e.layer.has_lora for e in entries):
        if requantize:
            raise ValueError(
                f"keras_qlora.merge(requantize=True): model '{model.name}' "
                "has no LoRA layers, so there is nothing to fold into its "
                "NF4 weights."
            )
        if adapter is not None:
            raise ValueError(
                f"keras_qlora.merge(): model '{model.name}' has no LoRA "
                f"adapters. Received: adapter={adapter!r}; pass None to "
                "dequantize its NF4 layers."
            )
        return None
    if adapter is None:
        if not named.adapters_enabled(model):
            raise ValueError(
                "keras_qlora.merge(): the model's adapters are disabled "
                "(disable_adapters()), so none is active. Call "
                "keras_qlora.enable_adapters(model) first, or name the "
                "adapter to merge, e.g. adapter='default'."
            )
        return named.active_adapter(model)
    check_adapter_name(adapter, "adapter")
    names = named.list_adapters(model)
    if adapter not in names:
        raise ValueError(
            f"keras_qlora.merge(): the model has no adapter named "
            f"{adapter!r}. Its adapters: {names}"
        )
    return adapter


def _check_finite(kernel, path, adapter):
    bad = int(kernel.size - np.count_nonzero(np.isfinite(kernel)))
    if bad:
        source = "no adapter" if adapter is None else f"adapter {adapter!r}"
        raise ValueError(
            f"keras_qlora.merge(): the merged kernel of layer '{path}' has "
            f"{bad} non-finite values (NaN or Inf) with {source}. Nothing "
            "was changed. Check that layer's NF4 state and lora_a / lora_b."
        )


def _check_bool(value, arg):
    if not isinstance(value, bool):
        raise TypeError(
            f"{arg} must be True or False. Received: {arg}={value!r}"
        )


def _reset_compiled_functions(model):
    # Traced train/test/predict functions captured the old layers and
    # variables; Keras retraces when they are None.
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
