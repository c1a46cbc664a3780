"""`from_preset`: a keras_hub preset straight into a 4-bit QLoRAModel.

The steps, so that no quantized layer's float kernel is ever allocated:
1. check the preset directory's files (`files.preset_format`);
2. build the model with keras_hub's own `from_preset(load_weights=False)`
   while every variable is deferred (`keras_qlora.deferred`);
3. resolve `apply()`'s selectors on it and build the QLoRA layers (their
   NF4 variables, 4.127 bits per weight);
4. initialize every other variable, then load the weights with keras_hub's
   own loading (its Transformers converters, or `load_weights` of its own
   format), quantizing each selected kernel as it is written
   (`capture.capture_kernels`);
5. swap the layers in, exactly as `apply()` does.

keras_hub is imported on first use, so `import keras_qlora` stays light.
"""

import os

from keras_qlora import convert
from keras_qlora import deferred
from keras_qlora import internals
from keras_qlora import rewrite
from keras_qlora.loading import capture
from keras_qlora.loading import files


def from_preset(
    model_class, preset, dtype=None, model_kwargs=None, **apply_kwargs
):
    """Loads a keras_hub preset directly into a 4-bit `QLoRAModel`.

    The result equals `keras_qlora.apply(model_class.from_preset(preset,
    dtype=dtype), **apply_kwargs)`: the same NF4 bytes, outputs, summary,
    `.keras` file, adapters and exports. But the float model is never built:
    the kernels of the layers that become NF4 are quantized one by one as
    the checkpoint is read, so peak memory is the 4-bit model plus one
    layer's float kernel, not the float model.

    Args:
        model_class: a keras_hub backbone or task class, e.g.
            `keras_hub.models.LlamaBackbone` or
            `keras_hub.models.LlamaCausalLM`.
        preset: a local preset directory: keras_hub's own format
            (config.json + model.weights.h5, or the sharded
            model.weights.json + shards that `save_to_preset(...,
            max_shard_size=...)` writes), or a Hugging Face Transformers
            directory (config.json + model.safetensors, or sharded with
            model.safetensors.index.json) of a family keras_hub converts
            (Llama, Mistral, Gemma, Qwen2, GPT-2, BERT, ...). Float32,
            bfloat16 and float16 checkpoints.
        dtype: the dtype (policy) of the layers that stay float
            (embeddings, norms, kept heads) and the compute dtype, passed to
            keras_hub as `dtype=`. None: keras_hub's default.
        model_kwargs: more keyword arguments for `model_class.from_preset`
            (e.g. `{"preprocessor": None}` for a task whose preset has no
            tokenizer files).
        **apply_kwargs: `keras_qlora.apply()` arguments (`rank`,
            `target_modules`, `gradient_checkpointing`, `verbose`, ...).
            With `verbose` (the default) a progress bar shows layers
            quantized and MiB read.

    Returns:
        A `QLoRAModel`, as `apply()` returns.

    Raises:
        TypeError: `model_class` is not a keras_hub Backbone/Task class, an
            unknown `apply()` argument, `model_kwargs` not a dict.
        ValueError: a preset that cannot load completely (missing
            config/weights, a shard listed but absent, a truncated file, a
            family keras_hub cannot convert, a tensor of the wrong shape or
            dtype, a layer the checkpoint has no weight for); each message
            names the file or tensor. Nothing is returned half-loaded. Also
            every error of `apply()` (bad settings, nothing matched).

    Example:
    >>> model = keras_qlora.from_preset(                 # doctest: +SKIP
    ...     keras_hub.models.LlamaCausalLM, "/data/llama-2-7b-hf",
    ...     dtype="bfloat16", target_modules="all-linear",
    ...     gradient_checkpointing=True, optimizer_8bit=True)
    """
    _check_model_class(model_class)
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(
            "model_kwargs must be a dict of keyword arguments for "
            "model_class.from_preset, or None. Received: "
            f"model_kwargs={model_kwargs!r}"
        )
    settings, chosen, training, verbose = rewrite.options(**apply_kwargs)
    kind, config, weight_files = files.preset_format(preset)
    preset = os.fspath(preset)
    loader = _preset_loader(preset, kind, config)
    model = _build_skeleton(model_class, preset, loader, dtype, model_kwargs)
    selection = rewrite.prepare(model, settings, chosen, training)
    prebuilt, targets = {}, {}
    for entry, with_lora in selection.plan:
        layer = entry.layer
        if not deferred.is_deferred(layer.kernel):
            continue  # a task head built in float: apply() quantizes it
        qlora = convert.convert_layer(
            layer, settings, with_lora, quantize=False
        )
        prebuilt[id(layer)] = qlora
        targets[id(layer.kernel)] = (entry.path, layer, qlora)
    deferred.initialize(v for v in model.weights if id(v) not in targets)
    with capture.capture_kernels(model.weights, targets, verbose) as caught:
        _load_weights(model, loader, kind, preset, weight_files)
    missing = caught.missing()
    if missing:
        raise ValueError(
            f"Preset '{preset}' has no weight for {len(missing)} layer(s) "
            f"that would be quantized: {missing[:10]}. Its files: "
            f"{[os.path.basename(f) for f in weight_files]}"
        )
    return rewrite.finish(
        model, settings, training, selection, verbose=False, prebuilt=prebuilt
    )


def _build_skeleton(model_class, preset, loader, dtype, model_kwargs):
    """keras_hub's own `from_preset(load_weights=False)`, with the
    backbone's variables deferred (no memory) .

    A task is built around that backbone outside the deferred scope: its
    constructor compiles a default optimizer, whose variables cannot be
    deferred; its own layers (heads) are small and built as keras_hub does.
    """
    import keras_hub

    kwargs = dict(model_kwargs or {})
    backbone_kwargs = {} if dtype is None else {"dtype": dtype}
    if not issubclass(model_class, keras_hub.models.Task):
        with deferred.deferred_variables():
            return model_class.from_preset(
                preset, load_weights=False, **backbone_kwargs, **kwargs
            )
    backbone_class = loader.check_backbone_class()
    with deferred.deferred_variables():
        backbone = backbone_class.from_preset(
            preset, load_weights=False, **backbone_kwargs
        )
    return model_class.from_preset(
        preset, load_weights=False, backbone=backbone, **kwargs
    )


def _check_model_class(model_class):
    import keras_hub

    bases = (keras_hub.models.Backbone, keras_hub.models.Task)
    if not (isinstance(model_class, type) and issubclass(model_class, bases)):
        raise TypeError(
            "model_class must be a keras_hub Backbone or Task class, such "
            "as keras_hub.models.LlamaBackbone or "
            f"keras_hub.models.LlamaCausalLM. Received: {model_class!r}"
        )


def _preset_loader(preset, kind, config):
    """keras_hub's loader for the preset (it knows the converters)."""
    try:
        return internals.preset_loader(preset)
    except ValueError as err:
        if kind == "transformers":
            raise ValueError(
                f"'{os.path.join(preset, files.CONFIG_FILE)}' has "
                f"model_type={config.get('model_type')!r}, which keras_hub "
                f"cannot convert: {err}"
            ) from None
        raise


def _load_weights(model, loader, kind, preset, weight_files):
    """Fills `model` with keras_hub's own loading; errors name the preset."""
    import keras_hub

    backbone = model
    if isinstance(model, keras_hub.models.Task):
        backbone = model.backbone
    try:
        if kind == "transformers":
            _load_transformers(model, backbone, loader, preset)
        else:
            _load_keras(model, backbone, loader, preset)
    except ValueError as err:
        if str(preset) in str(err):
            raise
        raise ValueError(
            f"Could not load the weights of preset '{preset}' "
            f"({', '.join(os.path.basename(f) for f in weight_files)}): "
            f"{err}"
        ) from err
    except (KeyError, OSError, TypeError) as err:
        raise ValueError(
            f"Could not load the weights of preset '{preset}' "
            f"({', '.join(os.path.basename(f) for f in weight_files)}): "
            f"{type(err).__name__}: {err}"
        ) from err


def _load_transformers(model, backbone, loader, preset):
    import keras_hub

    class NamedLoader(internals.safetensor_loader_class()):
        """keras_hub's loader, reading each tensor with a plain read (its
        memory maps keep every shard resident until the end: the whole
        checkpoint in RSS) and naming the tensor in any error."""

        headers = {}

        def get_tensor(self, hf_weight_key):
            if self.safetensor_config is None:
                fname = self.fname or files.HF_WEIGHTS
            else:
                weight_map = self.safetensor_config["weight_map"]
                fname = weight_map[
                    self.get_prefixed_key(hf_weight_key, weight_map)
                ]
            path = os.path.join(preset, fname)
            if path not in self.headers:
                self.headers[path] = files.check_safetensors(path)
            header = self.headers[path]
            key = self.get_prefixed_key(hf_weight_key, header)
            return files.read_tensor(path, header, key)

        def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
            try:
                return super().port_weight(
                    keras_variable, hf_weight_key, hook_fn=hook_fn
                )
            except Exception as err:
                raise ValueError(
                    f"Preset '{preset}': tensor '{hf_weight_key}' could not "
                    f"be loaded into '{keras_variable.path}' (shape "
                    f"{tuple(keras_variable.shape)}): {err}"
                ) from err

    if isinstance(model, keras_hub.models.Task) and _loads_head(loader):
        raise ValueError(
            f"keras_qlora.from_preset cannot yet load the separate task "
            f"head of a {loader.config.get('architectures')} checkpoint; "
            "load the backbone class instead."
        )
    with NamedLoader(preset) as safetensors:
        loader.converter.convert_weights(backbone, safetensors, loader.config)


def _loads_head(loader):
    """True where keras_hub would load a head from a Transformers preset."""
    architecture = (loader.config.get("architectures") or [""])[0]
    return "ForImageClassification" in architecture or architecture in (
        "ViTModel",
        "Gemma4AssistantForCausalLM",
    )


def _load_keras(model, backbone, loader, preset):
    import keras_hub

    if isinstance(model, keras_hub.models.Task):
        task_weights = os.path.join(preset, files.TASK_WEIGHTS)
        task_config = os.path.join(preset, "task.json")
        if os.path.isfile(task_weights) and os.path.isfile(task_config):
            files.check_h5(task_weights)
            model.load_task_weights(task_weights)
    internals.load_backbone_weights(loader, backbone)
