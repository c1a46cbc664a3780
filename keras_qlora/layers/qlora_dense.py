"""`QLoRADense`: a Dense layer with a frozen NF4 kernel and a LoRA adapter."""

import keras
from keras import ops

from keras_qlora.layers.base import QLoRALayerBase


@keras.saving.register_keras_serializable(package="keras_qlora")
class QLoRADense(QLoRALayerBase):
    """`activation(x @ W_nf4 + bias + scale * dropout(x) @ A @ B)`.

    The kernel `W` `[K, N]` is stored as packed NF4 (frozen); `A` `[K, r]`
    (kaiming-uniform) and `B` `[r, N]` (zeros) are float32 and trainable, so
    at initialization the layer computes exactly the dequantized Dense.
    The bias, if any, is kept and frozen. Usually made with `from_layer`.

    Args:
        units: output size N.
        activation: as in `keras.layers.Dense`.
        use_bias: as in `keras.layers.Dense`.
        **kwargs: LoRA / NF4 settings of `QLoRALayerBase` (`rank`,
            `lora_alpha`, `lora_dropout`, `use_rslora`, `block_size`,
            `double_quant`) and base Layer arguments.

    Example:
    >>> dense = keras.layers.Dense(64)
    >>> dense.build((None, 128))
    >>> layer = QLoRADense.from_layer(dense, rank=8)
    >>> layer(ops.ones((2, 128))).shape
    (2, 64)
    """

    SOURCE_TYPE = keras.layers.Dense

    def __init__(self, units, activation=None, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        is_int = isinstance(units, int) and not isinstance(units, bool)
        if not is_int or units <= 0:
            raise (ValueError if is_int else TypeError)(
                f"Layer '{self.name}': units must be a positive int. "
                f"Received: units={units!r}"
            )
        self.units = units
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.input_spec = keras.layers.InputSpec(min_ndim=2)

    def build(self, input_shape):
        k = input_shape[-1]
        if k is None:
            raise ValueError(
                f"Layer '{self.name}' needs a known last input dimension. "
                f"Received: input_shape={input_shape}"
            )
        self._build_qlora(int(k), self.units)
        self.bias = self._add_bias((self.units,)) if self.use_bias else None
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: k})

    def call(self, inputs, training=None):
        y = self._qlora_matmul(inputs, training=training)
        if self.bias is not None:
            y = y + ops.cast(self.bias, y.dtype)
        return self.activation(y) if self.activation is not None else y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
            }
        )
        return config

    @classmethod
    def _config_from_source(cls, layer):
        return {
            "units": layer.units,
            "activation": layer.activation,
            "use_bias": layer.use_bias,
            **cls._kept_from_source(layer),
        }

    def _source_input_shape(self, layer):
        return (None, int(layer.kernel.shape[0]))

    def _source_matrix(self, layer):
        return int(layer.kernel.shape[0]), self.units
