"""`QLoRAEinsumDense`: an EinsumDense with a frozen NF4 kernel and LoRA."""

import keras
from keras import ops

from keras_qlora.layers.base import QLoRALayerBase
from keras_qlora.layers.einsum_plan import plan_einsum


@keras.saving.register_keras_serializable(package="keras_qlora")
class QLoRAEinsumDense(QLoRALayerBase):
    """`activation(einsum(equation, x, W_nf4) + bias + LoRA)`.

    The equation must reduce to one matmul (see `einsum_plan`): the kernel
    is permuted to `(contracted..., free...)` and stored as a 2-D NF4 matrix
    `[K, N]`; LoRA `A` `[K, r]` and `B` `[r, N]` act in that 2-D view, so
    the adapter has the same meaning as PEFT's on the equivalent Linear.

    Args:
        equation: an EinsumDense equation, e.g. `"abc,cde->abde"`.
        kernel_shape: the kernel's shape, in the equation's order.
        activation: as in `keras.layers.EinsumDense`.
        bias_axes: output letters that carry a bias, or None.
        **kwargs: LoRA / NF4 settings of `QLoRALayerBase` and base Layer
            arguments.

    Raises:
        ValueError: an equation that does not reduce to a matmul, naming it.

    Example:
    >>> layer = QLoRAEinsumDense("abc,cde->abde", (64, 4, 16), rank=4)
    >>> layer(ops.ones((2, 5, 64))).shape
    (2, 5, 4, 16)
    """

    SOURCE_TYPE = keras.layers.EinsumDense

    def __init__(
        self,
        equation,
        kernel_shape,
        activation=None,
        bias_axes=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.plan = plan_einsum(equation, kernel_shape)
        self.equation = equation
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        self.activation = keras.activations.get(activation)
        self.bias_axes = bias_axes or None
        # Validates bias_axes now rather than at build time.
        self._bias_shape = self.plan.bias_shape(self.bias_axes)

    def build(self, input_shape):
        self._build_qlora(self.plan.k, self.plan.n)
        self.bias = None
        if self._bias_shape is not None:
            self.bias = self._add_bias(self._bias_shape)

    def call(self, inputs, training=None):
        x2d, batch_shape = self.plan.input_to_2d(inputs)  # (M, K)
        y2d = self._qlora_matmul(x2d, training=training)  # (M, N)
        y = self.plan.output_from_2d(y2d, batch_shape)
        if self.bias is not None:
            y = y + ops.cast(self.bias, y.dtype)
        return self.activation(y) if self.activation is not None else y

    def compute_output_shape(self, input_shape):
        return self.plan.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "equation": self.equation,
                "kernel_shape": list(self.kernel_shape),
                "activation": keras.activations.serialize(self.activation),
                "bias_axes": self.bias_axes,
            }
        )
        return config

    @classmethod
    def _config_from_source(cls, layer):
        return {
            "equation": layer.equation,
            "kernel_shape": tuple(layer.kernel.shape),
            "activation": layer.activation,
            "bias_axes": layer.bias_axes,
            **cls._kept_from_source(layer),
        }

    def _source_input_shape(self, layer):
        return None  # the kernel shape is in the config

    def _source_matrix(self, layer):
        return self.plan.k, self.plan.n

    def _kernel_to_2d(self, kernel):
        return ops.convert_to_numpy(self.plan.kernel_to_2d(kernel))
