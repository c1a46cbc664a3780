"""`apply()`: make a Keras model 4-bit and put LoRA adapters on targets.

As in QLoRA, every linear layer matched by `quantize_modules` becomes NF4
(frozen); those also matched by `target_modules` get a LoRA adapter; layers
matched by `modules_to_save` stay float and trainable; every other variable
is frozen. The result is a `QLoRAModel` wrapping the (edited) model.
"""

import dataclasses
import inspect
import re
import time
from collections.abc import Callable

import keras

from keras_qlora import convert
from keras_qlora import surgery
from keras_qlora.convert import numel
from keras_qlora.layers import QLoRALayerBase
from keras_qlora.layers.einsum_plan import plan_einsum
from keras_qlora.model import QLoRAModel
from keras_qlora.training import options as training_options

ALL_LINEAR = "all-linear"

# apply()'s arguments, by where they go: the NF4/LoRA settings, and the
# training options QLoRAModel applies.
SETTING_KEYS = (
    "rank",
    "alpha",
    "dropout",
    "target_modules",
    "quantize_modules",
    "exclude_modules",
    "modules_to_save",
    "block_size",
    "double_quant",
    "scale_search",
    "use_rslora",
)
TRAINING_KEYS = (
    "bias",
    "offload_optimizer",
    "optimizer_8bit",
    "gradient_checkpointing",
)


def apply(
    model,
    rank=8,
    alpha=16,
    dropout=0.0,
    target_modules=("query", "key", "value"),
    quantize_modules=ALL_LINEAR,
    exclude_modules=None,
    modules_to_save=None,
    block_size=64,
    double_quant=True,
    scale_search=True,
    use_rslora=False,
    bias="none",
    offload_optimizer=False,
    optimizer_8bit=False,
    gradient_checkpointing=False,
    verbose=True,
):
    """Quantizes `model` to NF4 and adds LoRA adapters; returns the wrapper.

    Layer selectors (`target_modules`, `quantize_modules`, `exclude_modules`,
    `modules_to_save`) accept:
    - a list/tuple of strings: exact layer name or suffix of the layer path
      (`"query"`, `"transformer_layer_0/self_attention/query"`);
    - a single string: a regular expression, full-matched against the path
      or the layer name;
    - a compiled `re.Pattern` (full match on paths);
    - a callable `(path, layer) -> bool`;
    - `"all-linear"`: every Dense/EinsumDense except output heads sized to a
      vocabulary (an Embedding's `input_dim`).
    Paths are layer names from the model down, joined by "/".

    Args:
        model: a built Keras model (Sequential, Functional, subclassed or a
            keras_hub backbone).
        rank: LoRA rank r.
        alpha: LoRA alpha; the adapter output is scaled by alpha / r.
        dropout: dropout on the adapter input during training.
        target_modules: layers that get LoRA adapters.
        quantize_modules: layers stored as frozen NF4; None quantizes only
            the targets.
        exclude_modules: layers left untouched (float, frozen).
        modules_to_save: layers left float and trainable (e.g. a task head).
        block_size, double_quant, scale_search: NF4 settings, see
            `keras_qlora.quantizers.quantize_nf4`.
        use_rslora: scale the adapter by alpha / sqrt(r).
        bias: which biases train, as PEFT's `bias`: "none", "all" (every
            layer's bias) or "lora_only" (biases of layers with LoRA).
        offload_optimizer: keep the optimizer state in host memory and
            apply the update there (`keras_qlora.training.
            HostOffloadOptimizer` wraps the optimizer given to `compile`).
        optimizer_8bit: store Adam/AdamW moments blockwise-quantized to
            8 bits (`keras_qlora.training.AdamW8bit` replaces the Adam or
            AdamW given to `compile`).
        gradient_checkpointing: recompute transformer blocks in the
            backward pass instead of keeping their activations: True
            detects the blocks; a selector (as above) names them.
        verbose: print a progress bar over the layers being quantized.

    Returns:
        A `QLoRAModel` that calls the edited model; `keras_qlora.summary()`
        prints what was done. The input model object is edited in place and
        should not be used on its own afterwards.

    `target_modules=None` gives a 4-bit model with no adapter (for
    inference); the training options then do not apply.

    Raises:
        ValueError: nothing matched (the message lists the model's
            Dense/EinsumDense paths), keras_qlora already applied, bad
            settings, training options on a model without LoRA, no
            transformer block found for `gradient_checkpointing=True`.
        TypeError: a bad selector or option type.

    Example:
    >>> model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(
    ...     16, name="query")])
    >>> model = apply(model, rank=4, verbose=False)
    >>> [v.name for v in model.trainable_variables]
    ['lora_a', 'lora_b']
    """
    arguments = locals()
    settings = {key: arguments[key] for key in SETTING_KEYS}
    training = {key: arguments[key] for key in TRAINING_KEYS}
    _check_model(model)
    selection = prepare(model, settings, training)
    return finish(model, settings, training, selection, verbose=verbose)


def options(**kwargs) -> tuple:
    """Splits `apply()` keyword arguments, with `apply()`'s defaults.

    Returns:
        `(settings, training, verbose)` as `apply()` uses them.

    Raises:
        TypeError: an argument `apply()` does not take (the message lists
            the ones it takes).
    """
    signature = inspect.signature(apply)
    try:
        bound = signature.bind(None, **kwargs)
    except TypeError as err:
        allowed = ", ".join(list(signature.parameters)[1:])
        raise TypeError(f"{err}. apply() takes: {allowed}") from None
    bound.apply_defaults()
    args = bound.arguments
    return (
        {key: args[key] for key in SETTING_KEYS},
        {key: args[key] for key in TRAINING_KEYS},
        args["verbose"],
    )


def prepare(model, settings, training) -> "Selection":
    """Checks the settings and training options against `model` and
    resolves its selectors; edits nothing (everything that can be refused
    is refused here, before the model changes)."""
    training_options.check_options(
        training, settings["target_modules"] is not None
    )
    if training["gradient_checkpointing"] is not False:
        from keras_qlora.training.remat import find_blocks

        find_blocks(model, training["gradient_checkpointing"])
    return select(model, settings)


def finish(model, settings, training, selection, verbose, prebuilt=None):
    """Replaces the selected layers and wraps `model` in a `QLoRAModel`.

    `prebuilt` maps `id(float layer)` to its QLoRA layer with the NF4 state
    already filled (`keras_qlora.from_preset` quantizes while loading);
    those layers' float kernels are never read.
    """
    bytes_before = convert.variable_bytes(model)
    params_before = sum(numel(v) for v in model.weights)
    report = rewrite(model, settings, selection, verbose, prebuilt)
    report["bytes_before"] = bytes_before
    report["params_before"] = params_before
    return QLoRAModel(
        model, settings=settings, report=report, training=training
    )


def rewrite(model, settings, selection, verbose=False, prebuilt=None):
    """Replaces the layers of `selection` in place; returns a report."""
    start = time.perf_counter()
    replaced = convert.execute(
        selection.plan,
        settings,
        quantize=True,
        verbose=verbose,
        prebuilt=prebuilt,
    )
    convert.freeze(model, selection.saved_paths)
    return {
        "replaced": replaced,
        "modules_to_save": selection.saved_paths,
        "unmatched_targets": selection.unmatched_targets,
        "seconds": time.perf_counter() - start,
    }


@dataclasses.dataclass
class Selection:
    """What `rewrite` will do: `plan` lists `(Found, with_lora)` of the
    layers to quantize, `saved_paths` the `modules_to_save` paths."""

    plan: list
    saved_paths: list
    unmatched_targets: list


def select(model, settings) -> Selection:
    """Resolves the selectors of `settings` against `model`; edits nothing.

    Raises:
        ValueError: keras_qlora already applied, nothing to quantize, or
            target modules not found (the messages list the model's
            Dense/EinsumDense paths).
    """
    convert.check_settings(settings)
    found = surgery.walk(model)
    existing = [f.path for f in found if isinstance(f.layer, QLoRALayerBase)]
    if existing:
        raise ValueError(
            "keras_qlora.apply() was already applied to this model: it holds "
            f"QLoRA layers ({', '.join(existing[:5])}). Apply it once, to "
            "the float model."
        )
    linear = [f for f in found if convert.convertible(f.layer)]
    vocab_sizes = {
        f.layer.input_dim
        for f in found
        if isinstance(f.layer, keras.layers.Embedding)
    }
    targets = _select(settings["target_modules"], linear, vocab_sizes)
    excluded = _select(settings["exclude_modules"], linear, vocab_sizes)
    saved = _select(settings["modules_to_save"], found, vocab_sizes)
    quant = targets | _select(settings["quantize_modules"], linear, vocab_sizes)
    quant -= excluded | saved
    targets &= quant
    if not quant:
        names = ", ".join(f.path for f in linear) or "(none)"
        raise ValueError(
            "Nothing to quantize: quantize_modules "
            f"{_describe_selector(settings['quantize_modules'])} and "
            "target_modules matched no layer. The model's Dense/EinsumDense "
            f"layers are: {names}"
        )
    if not targets and settings["target_modules"] is not None:
        names = ", ".join(f.path for f in linear) or "(none)"
        raise ValueError(
            "Target modules "
            f"{_describe_selector(settings['target_modules'])} not found "
            f"in the model. Its Dense/EinsumDense layers are: {names}"
        )
    return Selection(
        plan=[
            (f, id(f.layer) in targets) for f in linear if id(f.layer) in quant
        ],
        saved_paths=[f.path for f in found if id(f.layer) in saved],
        unmatched_targets=_unmatched(settings["target_modules"], found),
    )


def _check_model(model):
    if isinstance(model, QLoRAModel):
        raise ValueError(
            "keras_qlora.apply() was already applied: this is a QLoRAModel. "
            "Apply it once, to the float model."
        )
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "keras_qlora.apply() expects a Keras model or layer. "
            f"Received: {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built. Build it (call it on a "
            "batch, or give it an Input) before keras_qlora.apply()."
        )


def _output_size(layer):
    """N of the layer's `[K, N]` matmul (all output features), or None."""
    kernel = getattr(layer, "kernel", None)
    if kernel is None or len(kernel.shape) == 0:
        return None
    if isinstance(layer, keras.layers.EinsumDense):
        try:
            return plan_einsum(layer.equation, tuple(kernel.shape)).n
        except ValueError:
            return None
    return int(kernel.shape[-1])


def _select(selector, entries, vocab_sizes):
    """ids of the entries' layers matched by `selector`."""
    if selector is None:
        return set()
    if isinstance(selector, str) and selector == ALL_LINEAR:
        return {
            id(f.layer)
            for f in entries
            if convert.convertible(f.layer)
            and _output_size(f.layer) not in vocab_sizes
        }
    match = _matcher(selector)
    return {id(f.layer) for f in entries if match(f.path, f.layer)}


def _matcher(selector) -> Callable:
    if isinstance(selector, re.Pattern):
        return lambda path, layer: selector.fullmatch(path) is not None
    if isinstance(selector, str):
        try:
            pattern = re.compile(selector)
        except re.error as e:
            raise ValueError(
                f"Module selector {selector!r} is not a valid regular "
                f"expression ({e}). Pass a list of names for exact/suffix "
                "matching."
            ) from None
        return lambda path, layer: (
            pattern.fullmatch(path) is not None
            or pattern.fullmatch(layer.name) is not None
        )
    if callable(selector):
        return lambda path, layer: bool(selector(path, layer))
    if isinstance(selector, (list, tuple, set, frozenset)):
        names = list(selector)
        for name in names:
            if not isinstance(name, str) or not name:
                raise TypeError(
                    "Module selector lists must hold non-empty strings. "
                    f"Received: {name!r} in {selector!r}"
                )
        return lambda path, layer: any(
            layer.name == n or path == n or path.endswith("/" + n)
            for n in names
        )
    raise TypeError(
        "A module selector must be a list of names, a regex string, a "
        "re.Pattern, a callable (path, layer) -> bool, 'all-linear' or "
        f"None. Received: {selector!r}"
    )


def _unmatched(selector, found):
    """Names in a list selector that match no layer at all."""
    if not isinstance(selector, (list, tuple, set, frozenset)):
        return []
    return [
        name
        for name in selector
        if not any(_matcher([name])(f.path, f.layer) for f in found)
    ]


def _describe_selector(selector):
    if callable(selector) and not isinstance(selector, str):
        return getattr(selector, "__name__", repr(selector))
    return repr(selector)
