"""`QLoRAModel`: the model `apply()` returns.

It wraps the edited base model and carries what is needed to rebuild it:
the base model's own config (which, for keras_hub backbones, rebuilds plain
Dense/EinsumDense sublayers), the NF4/LoRA settings and the exact list of
replaced layers. `from_config` rebuilds the base model, puts QLoRA layers
back at the recorded paths, and only then are the saved weights loaded, so
a `.keras` round trip keeps the 4-bit packing and the separate LoRA weights.
"""

import keras

from keras_qlora import convert
from keras_qlora import surgery
from keras_qlora.layers import QLoRALayerBase

# Settings that define the structure; selectors are not stored (the exact
# replaced paths are), so callables and regexes never need serializing.
_STRUCTURE_KEYS = (
    "rank",
    "alpha",
    "dropout",
    "block_size",
    "double_quant",
    "scale_search",
    "use_rslora",
)


@keras.saving.register_keras_serializable(package="keras_qlora")
class QLoRAModel(keras.Model):
    """A model whose linear layers are NF4 and whose targets carry LoRA.

    Made by `keras_qlora.apply()`; call, `compile`, `fit`, `evaluate`,
    `predict` and `save` work as for any Keras model. Only LoRA variables
    (and `modules_to_save`) are trainable.

    Args:
        base_model: the edited model that does the computation.
        settings: the `apply()` settings.
        report: what `apply()` did (see `keras_qlora.summary`).
    """

    def __init__(self, base_model, settings, report=None, **kwargs):
        kwargs.setdefault("name", f"qlora_{base_model.name}")
        super().__init__(**kwargs)
        self.base_model = base_model
        self.settings = {k: settings[k] for k in _STRUCTURE_KEYS}
        self.qlora_report = dict(report or {})
        if base_model.built:
            self.built = True

    def call(self, inputs, training=None):
        return self.base_model(inputs, training=training)

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

    def get_config(self):
        report = self.qlora_report
        return {
            "name": self.name,
            "base_model": keras.saving.serialize_keras_object(self.base_model),
            "settings": dict(self.settings),
            "replaced": [
                {"path": r["path"], "lora": bool(r["lora"])}
                for r in report.get("replaced", [])
            ],
            "modules_to_save": list(report.get("modules_to_save", [])),
            "bytes_before": report.get("bytes_before"),
            "params_before": report.get("params_before"),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        base = keras.saving.deserialize_keras_object(
            config["base_model"], custom_objects=custom_objects
        )
        settings = dict(config["settings"])
        convert.restore(
            base, settings, config["replaced"], config["modules_to_save"]
        )
        report = {
            "replaced": [
                dict(r, type=None, shape=None) for r in config["replaced"]
            ],
            "modules_to_save": config["modules_to_save"],
            "bytes_before": config.get("bytes_before"),
            "params_before": config.get("params_before"),
        }
        return cls(base, settings, report=report, name=config.get("name"))
