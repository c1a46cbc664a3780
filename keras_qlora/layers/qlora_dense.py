"""`QLoRADense`: a Dense layer with a frozen NF4 kernel and a LoRA adapter."""

import keras
from keras import ops

from keras_qlora.layers.base import QLoRALayerBase
from keras_qlora.layers.base import check_source_kernel
from keras_qlora.layers.base import check_source_layer
from keras_qlora.quantizers import quantize_nf4


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

    def __init__(self, units, activation=None, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        if isinstance(units, bool) or not isinstance(units, int) or units <= 0:
            raise ValueError(
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
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer="zeros",
                trainable=False,
            )
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
    def from_layer(
        cls,
        layer,
        rank=None,
        lora_alpha=16.0,
        lora_dropout=0.0,
        use_rslora=False,
        block_size=64,
        double_quant=True,
        scale_search=True,
        quantize=True,
    ):
        """Builds a `QLoRADense` from a built `keras.layers.Dense`.

        Args:
            layer: the float Dense layer (left unchanged).
            rank: LoRA rank, or None for no adapter.
            lora_alpha, lora_dropout, use_rslora: LoRA settings.
            block_size, double_quant, scale_search: NF4 settings, as in
                `keras_qlora.quantizers.quantize_nf4`.
            quantize: when False, only the structure is built (weights are
                zeros), for loading saved weights into it.

        Returns:
            A built `QLoRADense` with the same name, dtype policy, bias and
            activation.

        Raises:
            TypeError: not a Dense layer, or a non-float kernel.
            ValueError: unbuilt layer, NaN/Inf kernel, bad settings.
        """
        if not isinstance(layer, keras.layers.Dense):
            raise TypeError(
                "QLoRADense.from_layer expects a keras.layers.Dense. "
                f"Received: {type(layer).__name__} "
                f"'{getattr(layer, 'name', '')}'"
            )
        check_source_layer(layer)
        kernel = layer.kernel
        value = check_source_kernel(layer, kernel) if quantize else None
        new = cls(
            units=layer.units,
            activation=layer.activation,
            use_bias=layer.use_bias,
            rank=rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            block_size=block_size,
            double_quant=double_quant,
            name=layer.name,
            dtype=layer.dtype_policy,
        )
        new.build((None, int(kernel.shape[0])))
        if quantize:
            new.set_nf4_state(
                quantize_nf4(value, block_size, double_quant, scale_search)
            )
            if layer.use_bias:
                new.bias.assign(layer.bias)
        return new
