"""`QLoRAModel`: the model `apply()` returns.

It wraps the edited base model and carries what is needed to rebuild it:
the base model's own config (which, for keras_hub backbones, rebuilds plain
Dense/EinsumDense sublayers), the NF4/LoRA settings and the exact list of
replaced layers. `from_config` rebuilds the base model (its variables
deferred, so the float kernels of the replaced layers are never allocated),
puts QLoRA layers back at the recorded paths, and only then are the saved
weights loaded, so a `.keras` round trip keeps the 4-bit packing and the
separate LoRA weights.
"""

import os

import keras

from keras_qlora import atomic
from keras_qlora import convert
from keras_qlora import deferred
from keras_qlora import export
from keras_qlora import internals
from keras_qlora import remat
from keras_qlora import surgery
from keras_qlora.chunked import attention_layers
from keras_qlora.layers import QLoRALayerBase
from keras_qlora.selectors import exact_paths
from keras_qlora.settings import QLoRASettings
from keras_qlora.training import multi_worker
from keras_qlora.training import options as training_options
from keras_qlora.training import step as training_step
from keras_qlora.training.options import TrainingOptions
from keras_qlora.wrapper import QLoRAWrapper


@keras.saving.register_keras_serializable(package="keras_qlora")
class QLoRAModel(QLoRAWrapper, internals.SymbolicBuildHook, keras.Model):
    """A model whose linear layers are NF4 and whose targets carry LoRA.

    Made by `keras_qlora.apply()`; call, `compile`, `fit`, `evaluate`,
    `predict` and `save` work as for any Keras model. Only LoRA variables
    (and `modules_to_save`) are trainable.

    Training: `fit` runs a LoRA-only step (`keras_qlora.training.step`):
    gradients and optimizer slots exist only for the LoRA matrices and the
    opted-in variables (`modules_to_save`, `bias`). `compile` applies the
    `optimizer_8bit` / `offload_optimizer` options of `apply()` to the
    optimizer it is given.

    Selectors are not stored (the exact replaced paths are), so callables
    and regexes never need serializing.

    Args:
        base_model: the edited model that does the computation.
        settings: the `QLoRASettings` the layers were made with.
        report: what `apply()` did (see `keras_qlora.summary`).
        training: the `TrainingOptions` (`bias`, `offload_optimizer`,
            `optimizer_8bit`, `gradient_checkpointing`,
            `attention_chunk_size`, `lm_loss_chunk_size`), see `apply()`,
            or their dict; None for the defaults.
    """

    def __init__(
        self, base_model, settings, report=None, training=None, **kwargs
    ):
        if not isinstance(base_model, keras.layers.Layer):
            raise TypeError(
                "QLoRAModel base_model must be a Keras model or layer (use "
                "keras_qlora.apply(model) to make one). Received: "
                f"{type(base_model).__name__}"
            )
        kwargs.setdefault("name", f"qlora_{base_model.name}")
        # The wrapper computes in the base model's policy, so compile()
        # adds loss scaling under mixed_float16.
        kwargs.setdefault("dtype", base_model.dtype_policy)
        super().__init__(**kwargs)
        if not isinstance(settings, QLoRASettings):
            raise TypeError(
                "QLoRAModel settings must be a QLoRASettings. Received: "
                f"{type(settings).__name__}"
            )
        self.base_model = base_model
        self.settings = settings
        self.qlora_report = dict(report or {})
        self.training_options = TrainingOptions.from_dict(training)
        self._apply_training_options()
        _forget_traced_functions(base_model)
        if base_model.built:
            self.built = True

    def call(self, inputs, training=None):
        return self.base_model(inputs, training=training)

    def __getattr__(self, name):
        # Called only when normal lookup fails: public attributes of the
        # wrapped model (`token_embedding`, `backbone`, `preprocessor`,
        # `transformer_layers`, ...) read through, as PEFT's PeftModel
        # does. Private names never forward, so Keras' own tracking and
        # serialization see only the wrapper's state.
        base = self.__dict__.get("base_model")
        if name.startswith("_") or base is None:
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute '{name}'"
            )
        try:
            return getattr(base, name)
        except AttributeError:
            if hasattr(type(base), name):
                # The base model has it (a property) and it failed inside:
                # its own error says why, "no attribute" would hide it.
                raise
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute '{name}', "
                f"and neither has its base model '{base.name}' "
                f"({type(base).__name__})."
            ) from None

    def generate(self, *args, **kwargs):
        """Forwards to the base model's `generate` (keras_hub CausalLM and
        Seq2SeqLM tasks), which runs the QLoRA layers.

        Raises:
            AttributeError: the base model has no `generate`.
        """
        generate = getattr(self.base_model, "generate", None)
        if generate is None:
            raise AttributeError(
                f"The base model '{self.base_model.name}' "
                f"({type(self.base_model).__name__}) has no generate(); "
                "only keras_hub generative tasks (CausalLM, Seq2SeqLM) do."
            )
        return generate(*args, **kwargs)

    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """Saves the model as `keras.Model.save` does; a local `.keras` file
        is written atomically.

        Differences from Keras for a local `.keras` path: the file is
        assembled next to `filepath` and renamed into place, so a failed
        save leaves the previous file as it was; a model whose weights hold
        NaN or Inf (training diverged) is refused, since loading such a
        file fails; and `overwrite=False` on an existing file raises
        instead of asking on the terminal.

        Raises:
            TypeError: `overwrite` is not a bool.
            FileExistsError: `filepath` exists and `overwrite` is False.
            keras_qlora.adapters.NonFiniteError (a ValueError): NaN or Inf
                weights; nothing is written.
            NotADirectoryError: a path above `filepath` is a file.
        """
        path = (
            os.fspath(filepath)
            if isinstance(filepath, os.PathLike)
            else filepath
        )
        local = (
            isinstance(path, str)
            and path.endswith(".keras")
            and "://" not in path
            and zipped is not False
        )
        if not local:
            return super().save(
                filepath, overwrite=overwrite, zipped=zipped, **kwargs
            )
        target = os.path.abspath(path)
        atomic.check_overwrite(target, overwrite)
        export.check_finite_weights(self, target)
        with atomic.staging_file(target, suffix=".keras") as tmp:
            super().save(tmp, overwrite=True, zipped=zipped, **kwargs)

    def compile(self, optimizer="adamw", *args, **kwargs):
        """As `keras.Model.compile` (`loss`, `metrics`, ... by position or
        by name); the optimizer gets the 8-bit / host offload options given
        to `apply()`.

        Raises:
            TypeError: `optimizer_8bit` with an optimizer other than
                Adam/AdamW, or `offload_optimizer` with an optimizer whose
                state cannot move to the host, or an `optimizer` that is
                neither an optimizer, its name nor its config.
            ValueError: an unknown optimizer name.
        """
        optimizer = training_options.prepare_optimizer(
            optimizer, self.training_options
        )
        super().compile(optimizer, *args, **kwargs)

    def compile_from_config(self, config):
        # Keras skips compile-on-load for models that override compile();
        # ours only adds the optimizer options, so replay it.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def train_step(self, data):
        variables = training_step.trained_variables(
            self, self._frozen_variable_ids()
        )
        logs = training_step.lora_train_step(
            self,
            data,
            variables,
            lm_loss_chunk_size=self.training_options.lm_loss_chunk_size,
        )
        if multi_worker.is_multi_worker(self.distribute_strategy):
            logs = multi_worker.with_replica_axis(logs)
        return logs

    def make_train_function(self, force=False):
        # Keras builds the optimizer inside the first trace of the train
        # step when no strategy is set, which traces the step twice and
        # keeps both graphs; building it here, eagerly, traces once.
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and not optimizer.built and self.built:
            optimizer.build(self.trainable_variables)
        super().make_train_function(force=force)
        self.train_function = _trim_after_first_call(self.train_function)
        return self.train_function

    def test_step(self, data):
        logs = super().test_step(data)
        if multi_worker.is_multi_worker(self.distribute_strategy):
            logs = multi_worker.with_replica_axis(logs)
        return logs

    def before_symbolic_build(self, iterator, data_batch):
        # See keras_qlora/training/multi_worker.py (keras-team/keras#20585).
        strategy = self.distribute_strategy
        if iterator is not None and multi_worker.is_multi_worker(strategy):
            data_batch = multi_worker.first_local_batch(iterator, strategy)
            iterator = None
        return iterator, data_batch

    def qlora_layers(self, lora_only=False) -> dict:
        """`{path: layer}` of the QLoRA layers, paths as in `summary()`.

        Args:
            lora_only: only the layers that carry a LoRA adapter.
        """
        return {
            entry.path: entry.layer
            for entry in surgery.walk(self.base_model)
            if isinstance(entry.layer, QLoRALayerBase)
            and (entry.layer.has_lora or not lora_only)
        }

    def _frozen_variable_ids(self):
        ids = set()
        for layer in self.qlora_layers().values():
            table = dict(layer._variable_table())
            ids.update(id(v) for n, v in table.items() if n.startswith("nf4"))
        return ids

    def _apply_training_options(self):
        opts = self.training_options
        entries = [
            (e.layer, isinstance(e.layer, QLoRALayerBase) and e.layer.has_lora)
            for e in surgery.walk(self.base_model)
        ]
        for bias in training_options.bias_variables(entries, opts.bias):
            bias.trainable = True
        self.remat_paths = []
        if opts.gradient_checkpointing is not False:
            self.remat_paths = remat.enable_gradient_checkpointing(
                self.base_model, opts.gradient_checkpointing
            )
        if opts.attention_chunk_size is not None:
            attention_layers.enable_chunked_attention(
                self.base_model, opts.attention_chunk_size
            )

    def get_config(self):
        report = self.qlora_report
        training = self.training_options.to_dict()
        # The blocks checkpointed now, as exact paths (selectors, callables
        # and regexes, are not stored; `enable_gradient_checkpointing` /
        # `disable_gradient_checkpointing` may have changed them since).
        training["gradient_checkpointing"] = (
            remat.checkpointed_layers(self.base_model) or False
        )
        return {
            "name": self.name,
            "base_model": keras.saving.serialize_keras_object(self.base_model),
            "settings": self.settings.to_dict(),
            "replaced": [
                {"path": r["path"], "lora": bool(r["lora"])}
                for r in report.get("replaced", [])
            ],
            "modules_to_save": list(report.get("modules_to_save", [])),
            "bytes_before": report.get("bytes_before"),
            "params_before": report.get("params_before"),
            "training": training,
            "adapters": self._adapter_config(),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # The base model is rebuilt with deferred variables: the float
        # kernels of the layers that become QLoRA layers again are never
        # allocated; the rest is initialized once the swap is done.
        base = _deserialize_deferred(config["base_model"], custom_objects)
        settings = QLoRASettings.from_dict(config["settings"])
        training = dict(config.get("training") or {})
        if isinstance(training.get("gradient_checkpointing"), list):
            # Saved as exact paths: match those paths only, not suffixes.
            training["gradient_checkpointing"] = exact_paths(
                training["gradient_checkpointing"]
            )
        training = TrainingOptions.from_dict(training)
        convert.restore(
            base, settings, config["replaced"], config["modules_to_save"]
        )
        deferred.initialize(base.weights)
        report = {
            "replaced": [
                dict(r, type=None, shape=None) for r in config["replaced"]
            ],
            "modules_to_save": config["modules_to_save"],
            "bytes_before": config.get("bytes_before"),
            "params_before": config.get("params_before"),
        }
        model = cls(
            base,
            settings,
            report=report,
            training=training,
            name=config.get("name"),
        )
        training.check_model(bool(model.qlora_layers(lora_only=True)))
        # Named adapters exist before the weights (and optimizer slots for
        # the active one) load.
        adapters = config.get("adapters")
        if adapters:
            for layer in model.qlora_layers(lora_only=True).values():
                for name in adapters["names"][1:]:
                    layer.add_adapter(name)
                layer.set_adapter_state(adapters["active"], adapters["enabled"])
        return model

    def _adapter_config(self):
        layers = list(self.qlora_layers(lora_only=True).values())
        if not layers:
            return None
        first = layers[0]
        return {
            "names": list(first.adapter_names),
            "active": first.active_adapter,
            "enabled": bool(first.lora_enabled),
        }


def _forget_traced_functions(base_model):
    """Drops functions the base model traced before `apply()`.

    A keras_hub task caches its traced `generate` function: it would keep
    running (and holding) the float layers. XLA cannot compile the NF4 op,
    so an explicit jit_compile=True is turned off as well.
    """
    if getattr(base_model, "generate_function", None) is not None:
        base_model.generate_function = None
    for name in ("train_function", "test_function", "predict_function"):
        if getattr(base_model, name, None) is not None:
            setattr(base_model, name, None)
    internals.turn_off_jit_compile(base_model)


def _trim_after_first_call(function):
    """`function`, calling `convert.release_free_memory()` once after its
    first call.

    The first call of a train function traces the step, lets Grappler
    rewrite it and instantiates its kernels; the temporary copies of the
    graph and the step's tensors are freed by then, but glibc keeps the
    freed heap (about 200 MiB for an 8-layer, hidden-1024 Llama; see
    benchmarks/fit_growth.py), so RSS stays at the first step's peak for
    the rest of training. `malloc_trim` hands it back once. Later steps
    reuse what they free, so they are not trimmed.
    """
    if function is None or getattr(function, "_keras_qlora_trims", False):
        return function
    done = []

    def call(*args, **kwargs):
        result = function(*args, **kwargs)
        if not done:
            done.append(True)
            convert.release_free_memory()
        return result

    call._keras_qlora_trims = True
    call.__wrapped__ = function
    return call


def _deserialize_deferred(config, custom_objects):
    """The base model from its config, its variables deferred.

    A keras_hub task (`CausalLM`, `TextClassifier`, ...) compiles an
    optimizer in its constructor, whose variables cannot be deferred: its
    backbone is rebuilt deferred, then the task around it, as
    `keras_qlora.from_preset` does.
    """
    inner = config.get("config") if isinstance(config, dict) else None
    if isinstance(inner, dict) and isinstance(inner.get("backbone"), dict):
        with deferred.deferred_variables():
            backbone = keras.saving.deserialize_keras_object(
                inner["backbone"], custom_objects=custom_objects
            )
        config = dict(config, config=dict(inner, backbone=backbone))
        return keras.saving.deserialize_keras_object(
            config, custom_objects=custom_objects
        )
    with deferred.deferred_variables():
        return keras.saving.deserialize_keras_object(
            config, custom_objects=custom_objects
        )
