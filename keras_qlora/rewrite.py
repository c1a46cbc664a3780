"""`apply()`: make a Keras model 4-bit and put LoRA adapters on targets.

As in QLoRA, every linear layer matched by `quantize_modules` becomes NF4
(frozen); those also matched by `target_modules` get a LoRA adapter; layers
matched by `modules_to_save` stay float and trainable; every other variable
is frozen. The result is a `QLoRAModel` wrapping the (edited) model.
"""

import dataclasses
import inspect
import time

import keras
import numpy as np

from keras_qlora import convert
from keras_qlora import remat
from keras_qlora import selectors
from keras_qlora import settings as qlora_settings
from keras_qlora import surgery
from keras_qlora.convert import numel
from keras_qlora.layers import QLoRALayerBase
from keras_qlora.model import QLoRAModel
from keras_qlora.selectors import ALL_LINEAR
from keras_qlora.settings import QLoRASettings
from keras_qlora.training import options as training_options
from keras_qlora.training.options import TrainingOptions

# apply()'s layer selectors; its other arguments are the fields of
# `QLoRASettings` and `TrainingOptions`, and `verbose`.
SELECTOR_KEYS = (
    "target_modules",
    "quantize_modules",
    "exclude_modules",
    "modules_to_save",
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
    quant_type="nf4",
    use_rslora=False,
    bias="none",
    offload_optimizer=False,
    optimizer_8bit=False,
    gradient_checkpointing=False,
    attention_chunk_size=None,
    lm_loss_chunk_size=None,
    verbose=True,
):
    """Quantizes `model` to 4 bits (or 8) and adds LoRA adapters; returns the
    wrapper.

    Layer selectors (`target_modules`, `quantize_modules`, `exclude_modules`,
    `modules_to_save`; see `keras_qlora.selectors`) accept:
    - a list/tuple of strings: exact layer name or suffix of the layer path
      (`"query"`, `"transformer_layer_0/self_attention/query"`);
    - a single string: a regular expression, full-matched against the path
      or the layer name;
    - a compiled `re.Pattern` (full match on paths);
    - a callable `(path, layer) -> bool` (a non-bool result is refused);
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
        block_size, double_quant, scale_search: 4-bit settings, see
            `keras_qlora.quantizers.quantize_nf4`.
        quant_type: the frozen weights' format: "nf4" (NormalFloat-4, the
            default), "fp4" (bitsandbytes' 4-bit float; the same blocks,
            double quant and scale search) or "int8" (8 bits with one
            absmax scale per output, bitsandbytes' LLM.int8() weight:
            about twice NF4's memory, a quarter of its error; `block_size`,
            `double_quant` and `scale_search` do not apply). See
            docs/formats.md.
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
        attention_chunk_size: None, or an int: the attention layers
            (Keras MultiHeadAttention, keras_hub Llama / Mistral / Qwen /
            Gemma attention) compute attention by query chunks and key
            blocks of this size with an exact online softmax, forward and
            backward, so no (batch, heads, seq, seq) tensor is formed (see
            docs/training.md, "Long sequences"). Attention-probability
            dropout in training is refused.
        lm_loss_chunk_size: None, or an int: `fit` on a keras_hub CausalLM
            computes the LM head and the cross-entropy in sequence chunks
            of this size, recomputed in the backward pass, so the
            (batch, seq, vocab) logits never exist in full.
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
            transformer block found for `gradient_checkpointing=True`, no
            supported attention layer for `attention_chunk_size`, no
            keras_hub CausalLM for `lm_loss_chunk_size`.
        TypeError: a bad selector or option type.

    Example:
    >>> model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(
    ...     16, name="query")])
    >>> model = apply(model, rank=4, verbose=False)
    >>> [v.name for v in model.trainable_variables]
    ['lora_a', 'lora_b']
    """
    settings, chosen, training = _split(locals())
    _check_model(model)
    selection = prepare(model, settings, chosen, training)
    return finish(model, settings, training, selection, verbose=verbose)


def options(**kwargs) -> tuple:
    """Splits `apply()` keyword arguments, with `apply()`'s defaults.

    Returns:
        `(settings, selectors, training, verbose)`: a `QLoRASettings`, a
        dict of the `SELECTOR_KEYS`, a `TrainingOptions`, and a bool.

    Raises:
        TypeError: an argument `apply()` does not take (the message lists
            the ones it takes); TypeError / ValueError: a bad setting.
    """
    signature = inspect.signature(apply)
    try:
        bound = signature.bind(None, **kwargs)
    except TypeError as err:
        allowed = ", ".join(list(signature.parameters)[1:])
        raise TypeError(f"{err}. apply() takes: {allowed}") from None
    bound.apply_defaults()
    return _split(bound.arguments) + (bound.arguments["verbose"],)


def _split(arguments) -> tuple:
    """`apply()`'s arguments as `(QLoRASettings, selectors, TrainingOptions)`,
    each validated."""
    settings = QLoRASettings(
        **{k: arguments[k] for k in qlora_settings.field_names()}
    )
    chosen = {key: arguments[key] for key in SELECTOR_KEYS}
    training = TrainingOptions(
        **{k: arguments[k] for k in training_options.field_names()}
    )
    verbose = arguments["verbose"]
    if not isinstance(verbose, (bool, int, np.integer)):
        raise TypeError(
            "verbose must be True or False (or a Keras verbosity, 0, 1 or "
            f"2). Received: verbose={verbose!r}"
        )
    return settings, chosen, training


def prepare(model, settings, chosen, training) -> "Selection":
    """Checks the settings and training options against `model` and
    resolves its selectors; edits nothing (everything that can be refused
    is refused here, before the model changes)."""
    selection = select(model, settings, chosen)
    training.check_model(any(with_lora for _, with_lora in selection.plan))
    if training.gradient_checkpointing is not False:
        remat.find_blocks(
            model, training.gradient_checkpointing, "gradient_checkpointing"
        )
    training.check_long_context(model)
    return selection


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
        "unmatched_modules_to_save": selection.unmatched_saved,
        "seconds": time.perf_counter() - start,
    }


@dataclasses.dataclass
class Selection:
    """What `rewrite` will do: `plan` lists `(Found, with_lora)` of the
    layers to quantize, `saved_paths` the `modules_to_save` paths."""

    plan: list
    saved_paths: list
    unmatched_targets: list
    unmatched_saved: list = dataclasses.field(default_factory=list)


def select(model, settings, chosen) -> Selection:
    """Resolves the selectors `chosen` (`SELECTOR_KEYS`) against `model`;
    edits nothing.

    Raises:
        ValueError: keras_qlora already applied, nothing to quantize,
            target modules not found (the messages list the model's
            Dense/EinsumDense paths), or targets with `rank=None`.
    """
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

    def pick(key, entries):
        return selectors.select(chosen[key], entries, vocab_sizes, key)

    targets = pick("target_modules", linear)
    excluded = pick("exclude_modules", linear)
    saved = pick("modules_to_save", found)
    _check_saved(chosen["modules_to_save"], saved, found)
    matched_targets = set(targets)
    quant = targets | pick("quantize_modules", linear)
    quant -= excluded | saved
    targets &= quant
    names = ", ".join(f.path for f in linear) or "(none)"
    if matched_targets and not targets:
        removed = [f.path for f in linear if id(f.layer) in matched_targets]
        raise ValueError(
            f"target_modules {selectors.describe(chosen['target_modules'])} "
            f"matched {removed}, but exclude_modules / modules_to_save "
            "removed every one of them, so no layer would get LoRA. Drop "
            "them from exclude_modules / modules_to_save, or pass "
            "target_modules=None for a 4-bit model without adapters."
        )
    if not quant:
        raise ValueError(
            "Nothing to quantize: quantize_modules "
            f"{selectors.describe(chosen['quantize_modules'])} and "
            "target_modules matched no layer. The model's Dense/EinsumDense "
            f"layers are: {names}"
        )
    if not targets and chosen["target_modules"] is not None:
        raise ValueError(
            "Target modules "
            f"{selectors.describe(chosen['target_modules'])} not found "
            f"in the model. Its Dense/EinsumDense layers are: {names}"
        )
    if targets and not settings.has_lora:
        raise ValueError(
            "rank must be a positive int to put LoRA on target_modules "
            f"{selectors.describe(chosen['target_modules'])}; pass "
            "target_modules=None for a 4-bit model without adapters. "
            "Received: rank=None"
        )
    return Selection(
        plan=[
            (f, id(f.layer) in targets) for f in linear if id(f.layer) in quant
        ],
        saved_paths=[f.path for f in found if id(f.layer) in saved],
        unmatched_targets=selectors.unmatched(chosen["target_modules"], found),
        unmatched_saved=selectors.unmatched(chosen["modules_to_save"], found),
    )


def _check_saved(selector, saved, found):
    """Refuses a `modules_to_save` that matches no layer at all (a typo
    would otherwise leave the head frozen without a word); names that match
    nothing beside ones that do are reported (`summary()`)."""
    if selector is not None and not saved:
        raise ValueError(
            f"modules_to_save {selectors.describe(selector)} matched no "
            "layer of the model. Its layers are: "
            f"{', '.join(f.path for f in found) or '(none)'}"
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
    if convert.convertible(model):
        raise ValueError(
            f"keras_qlora.apply() edits the layers inside a model, and "
            f"received a bare {type(model).__name__} layer '{model.name}'. "
            "Wrap it in a model (e.g. keras.Sequential([keras.Input(...), "
            "layer])), or convert the layer itself with "
            "keras_qlora.QLoRADense.from_layer / "
            "QLoRAEinsumDense.from_layer."
        )
