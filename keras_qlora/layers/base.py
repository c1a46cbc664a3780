"""`QLoRALayerBase`: NF4 weight variables + LoRA adapter, shared by layers.

A subclass reduces its product to `x2d [M, K] @ W [K, N]`, calls
`_build_qlora(K, N)` in `build` and `_qlora_matmul(x2d)` in `call`; this
class owns the frozen NF4 variables, the float32 LoRA pair, their
serialization and the `NF4State` accessors.

Named adapters: besides its own pair ("default", the variables `lora_a` /
`lora_b`), a layer can hold more LoRA pairs (`add_adapter`), one of which
is active; only the active pair is used and trainable. All pairs have the
layer's rank, alpha and dropout.
"""

import keras
import numpy as np
from keras import ops

from keras_qlora import ops as qops
from keras_qlora.layers import saved_checksum
from keras_qlora.layers.adapter_slots import DEFAULT_ADAPTER
from keras_qlora.layers.adapter_slots import AdapterSlotsMixin
from keras_qlora.layers.adapter_slots import check_adapter_name
from keras_qlora.layers.frozen_state import frozen_variable_scope
from keras_qlora.layers.paths import adopt_parent_path
from keras_qlora.layers.source_checks import check_rank_fits
from keras_qlora.layers.source_checks import check_source_kernel
from keras_qlora.layers.source_checks import check_source_layer
from keras_qlora.layers.source_checks import check_source_values
from keras_qlora.ops.quantize import quantize_nf4_fused
from keras_qlora.quantizers import NF4State
from keras_qlora.quantizers import quantize_int8
from keras_qlora.quantizers.state import NESTED_BLOCK_SIZE
from keras_qlora.quantizers.state import num_blocks
from keras_qlora.quantizers.state import packed_bytes
from keras_qlora.settings import LAYER_KEYS
from keras_qlora.settings import QLoRASettings

# Saved as [index of the active adapter in `adapter_names`, enabled].
_STATE_KEY = "adapter_state"


class QLoRALayerBase(AdapterSlotsMixin, keras.layers.Layer):
    """Base of `QLoRADense` / `QLoRAEinsumDense`; not used directly.

    Args:
        settings: a `keras_qlora.settings.QLoRASettings`; or, instead, its
            values as the layer's config spells them: `rank` (a positive
            int, or None, the default, for a frozen NF4 layer with no
            adapter), `lora_alpha` (scale is `alpha / rank`, or
            `alpha / sqrt(rank)` with `use_rslora`), `lora_dropout` (rate
            on the adapter's input, in [0, 1)), `use_rslora`, `block_size`
            (32, 64, 128, 256), `double_quant` and `quant_type` (the frozen
            weight's format: "nf4", "fp4" or "int8").
        **kwargs: base Layer arguments.

    Raises:
        TypeError / ValueError: a bad setting (see `QLoRASettings`), named
            with the layer.
    """

    def __init__(
        self,
        settings=None,
        bias_regularizer=None,
        bias_constraint=None,
        **kwargs,
    ):
        given = {k: kwargs.pop(k) for k in LAYER_KEYS.values() if k in kwargs}
        super().__init__(**kwargs)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        if settings is None:
            settings = QLoRASettings.from_layer_config(given, self.name)
        elif given or not isinstance(settings, QLoRASettings):
            raise TypeError(
                f"Layer '{self.name}': pass either settings (a "
                f"QLoRASettings) or the arguments {sorted(given)}, not both. "
                f"Received: settings={settings!r}"
            )
        self.settings = settings
        self.lora_enabled = True
        self.active_adapter = DEFAULT_ADAPTER
        # Names of the extra adapters, kept sorted; a tuple of strings, which
        # Keras' tracker leaves alone.
        self._extra_adapters = ()
        # The custom TF op cannot be compiled by XLA.
        self.supports_jit = False
        self._lora_drop = (
            keras.layers.Dropout(self.lora_dropout, name="lora_dropout")
            if self.lora_dropout > 0
            else None
        )

    def _add_bias(self, shape):
        bias = self.add_weight(
            name="bias",
            shape=shape,
            initializer="zeros",
            regularizer=self.bias_regularizer,
            constraint=self.bias_constraint,
            trainable=True,
        )
        # Created trainable (TF records gradients, e.g. through
        # tf.recompute_grad, only for variables created trainable) and
        # frozen by default; `apply(bias=...)` unfreezes it.
        bias.trainable = False
        return bias

    @staticmethod
    def _kept_from_source(layer):
        """The float layer's regularizers and constraints that still apply
        (its kernel's are dropped: see `dropped_from_source`)."""
        return {
            "bias_regularizer": layer.bias_regularizer,
            "bias_constraint": layer.bias_constraint,
            "activity_regularizer": layer.activity_regularizer,
        }

    @staticmethod
    def dropped_from_source(layer) -> list:
        """Names of the float layer's settings a QLoRA layer cannot keep:
        a regularizer or constraint on the kernel, which is frozen NF4."""
        return [
            name
            for name in ("kernel_regularizer", "kernel_constraint")
            if getattr(layer, name, None) is not None
        ]

    # The settings, by the names a layer's config uses.
    rank = property(lambda self: self.settings.rank)
    lora_alpha = property(lambda self: self.settings.alpha)
    lora_dropout = property(lambda self: self.settings.dropout)
    use_rslora = property(lambda self: self.settings.use_rslora)
    block_size = property(lambda self: self.settings.block_size)
    # Whether the frozen weight holds 8-bit block scales (never for int8).
    double_quant = property(lambda self: self.settings.stores_double_quant)
    quant_type = property(lambda self: self.settings.quant_type)

    @property
    def state_block_size(self) -> int:
        """Elements per scale of the stored weight: `block_size`, or K for
        int8 (one scale per output)."""
        return self.settings.state_block_size(self.kernel_2d_shape[0])

    # -- build helpers -----------------------------------------------------

    def _build_qlora(self, k, n):
        check_rank_fits(self.name, self.rank, k, n)
        self.kernel_2d_shape = (int(k), int(n))
        blocks = num_blocks(k * n, self.state_block_size)
        size = packed_bytes(k * n, self.quant_type)
        # uint8 state cannot be broadcast by multi-worker strategies; see
        # frozen_state.py.
        with frozen_variable_scope():
            self.nf4_packed = self._add_state("nf4_packed", (size,), "uint8")
            self.nf4_absmax = self._add_state(
                "nf4_absmax", (blocks,), "uint8" if self.double_quant else None
            )
        self.nf4_absmax_scale = self.nf4_absmax_offset = None
        if self.double_quant:
            self.nf4_absmax_scale = self._add_state(
                "nf4_absmax_scale", (num_blocks(blocks, NESTED_BLOCK_SIZE),)
            )
            self.nf4_absmax_offset = self._add_state("nf4_absmax_offset", ())
        self.lora_a = self.lora_b = None
        if self.rank is not None:
            self.lora_a, self.lora_b = self._add_lora_pair("")

    def _add_state(self, name, shape, dtype=None):
        """A frozen NF4 state variable (float32 unless `dtype`)."""
        return self.add_weight(
            name=name,
            shape=shape,
            dtype=dtype or "float32",
            initializer="zeros",
            trainable=False,
            autocast=False,
        )

    def _add_lora_pair(self, suffix, trainable=True):
        k, n = self.kernel_2d_shape
        # LoRA weights stay float32 under any policy so that small updates
        # do not underflow; they are cast in `call`.
        lora_a = self.add_weight(
            name=f"lora_a{suffix}",
            shape=(k, self.rank),
            dtype="float32",
            # PEFT's kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(K)).
            initializer=keras.initializers.VarianceScaling(
                scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
            ),
            trainable=trainable,
            autocast=False,
        )
        lora_b = self.add_weight(
            name=f"lora_b{suffix}",
            shape=(self.rank, n),
            dtype="float32",
            initializer="zeros",
            trainable=trainable,
            autocast=False,
        )
        return lora_a, lora_b

    # -- properties ----------------------------------------------------------

    @property
    def lora_scale(self) -> float:
        """Multiplier of the LoRA product: alpha / r, or alpha / sqrt(r)."""
        return self.settings.lora_scale

    @property
    def has_lora(self) -> bool:
        """Whether the layer carries a LoRA adapter (its rank is set)."""
        return self.settings.has_lora

    # -- compute ------------------------------------------------------------

    def _qlora_matmul(self, x, training=None):
        """`x @ W_nf4 + scale * dropout(x) @ A @ B` on the last axis of x."""
        weight = qops.NF4Tensors(
            packed=self.nf4_packed,
            absmax=self.nf4_absmax,
            absmax_scale=self.nf4_absmax_scale,
            absmax_offset=self.nf4_absmax_offset,
            shape=self.kernel_2d_shape,
            block_size=self.state_block_size,
            quant_type=self.quant_type,
        )
        y = qops.nf4_matmul(x, weight)
        if self.rank is None or not self.lora_enabled:
            return y
        lora_a, lora_b = self.adapter_variables(self.active_adapter)
        h = x
        if self._lora_drop is not None:
            h = self._lora_drop(h, training=training)
        a = ops.cast(lora_a, self.compute_dtype)
        # The scale multiplies B (r x N, in float32) rather than the
        # (M, N) product: one M x N pass fewer in the forward pass and one
        # in the backward pass; the same result (exactly so when the scale
        # is a power of two, as alpha = 2 r).
        b = ops.cast(lora_b * self.lora_scale, self.compute_dtype)
        delta = ops.matmul(ops.matmul(h, a), b)  # (M, K) @ (K, r) @ (r, N)
        return y + delta

    # -- construction from a float layer --------------------------------------

    # Set by subclasses: the Keras layer type they replace.
    SOURCE_TYPE = None

    @classmethod
    def from_layer(cls, layer, settings=None, quantize=True, **kwargs):
        """Builds the QLoRA version of a built float layer.

        Args:
            layer: the float layer (`SOURCE_TYPE`); it is left unchanged.
            settings: a `QLoRASettings`; or, instead, keyword arguments as
                the constructor takes them (`rank`, `lora_alpha`, ...) and
                `scale_search`.
            quantize: when False, only the structure is built (weights are
                zeros), for loading saved weights into it.

        Returns:
            A built layer with the same name, dtype policy, bias and
            activation, whose NF4 kernel is the quantized float kernel.

        Raises:
            TypeError: a layer of another type, or a non-float kernel.
            ValueError: an unbuilt layer, a NaN/Inf kernel, bad settings.
        """
        if settings is None:
            scale_search = kwargs.pop("scale_search", True)
            settings = QLoRASettings.from_layer_config(
                kwargs, getattr(layer, "name", "?"), scale_search=scale_search
            )
            kwargs = {}
        new = cls._checked_new(layer, settings, **kwargs)
        value = check_source_kernel(layer, layer.kernel) if quantize else None
        adopt_parent_path(new, layer)
        new.build(new._source_input_shape(layer))
        if quantize:
            new.set_nf4_state(new.quantize_kernel(value))
            new.copy_bias_from(layer)
        return new

    @classmethod
    def check_source(cls, layer, settings, check_values=True, **kwargs):
        """Runs every check `from_layer` makes on `layer`, building nothing.

        `apply()` runs it over all selected layers before converting the
        first, so a refusal leaves the model as it was. It draws no random
        numbers (the trial layer has no dropout), so a seeded `apply()`
        initializes the adapters as it would without this check.

        Args:
            layer: the float layer.
            settings: the `QLoRASettings` the layer would get.
            check_values: also check the kernel is float and finite (on
                the variable, without a float32 copy).

        Raises:
            TypeError / ValueError: as `from_layer`.
        """
        cls._checked_new(layer, settings.replace(dropout=0.0), **kwargs)
        if check_values:
            check_source_values(layer, layer.kernel)

    @classmethod
    def _checked_new(cls, layer, settings, **kwargs):
        """The new layer for `layer`, constructed (not built), after the
        checks on the float layer and the rank."""
        if not isinstance(layer, cls.SOURCE_TYPE):
            raise TypeError(
                f"{cls.__name__}.from_layer expects a "
                f"keras.layers.{cls.SOURCE_TYPE.__name__}. Received: "
                f"{type(layer).__name__} '{getattr(layer, 'name', '')}'"
            )
        check_source_layer(layer)
        new = cls(
            **cls._config_from_source(layer),
            settings=settings,
            name=layer.name,
            dtype=layer.dtype_policy,
            **kwargs,
        )
        check_rank_fits(layer.name, new.rank, *new._source_matrix(layer))
        return new

    def quantize_kernel(self, kernel) -> NF4State:
        """Quantizes a float kernel of the source layer's shape (numpy,
        float32) with this layer's settings (format, blocks, double quant,
        scale search); does not store it."""
        return self.quantize_matrix(self._kernel_to_2d(kernel))

    def quantize_matrix(self, matrix, scale_search=None) -> NF4State:
        """Quantizes a float `[K, N]` matrix with this layer's format and
        settings (`scale_search` overrides the layer's); does not store
        it."""
        if scale_search is None:
            scale_search = self.settings.scale_search
        if self.quant_type == "int8":
            return quantize_int8(matrix)
        # The C++ quantizer when built (bit-identical, ~50x faster).
        return quantize_nf4_fused(
            matrix,
            self.block_size,
            self.double_quant,
            scale_search,
            quant_type=self.quant_type,
        )

    def copy_bias_from(self, layer):
        """Copies the source float layer's bias (if any) into this layer."""
        if self.bias is not None:
            self.bias.assign(ops.reshape(layer.bias, self.bias.shape))

    @classmethod
    def _config_from_source(cls, layer):
        """Constructor arguments (besides LoRA/NF4 ones) taken from `layer`."""
        raise NotImplementedError

    def _source_input_shape(self, layer):
        """The shape to build with, from the float layer."""
        raise NotImplementedError

    def _source_matrix(self, layer):
        """`(K, N)` of the float layer's kernel as this layer stores it."""
        raise NotImplementedError

    def _kernel_to_2d(self, kernel):
        """The float kernel (numpy) as the `[K, N]` matrix to quantize."""
        return kernel

    # -- NF4 state ------------------------------------------------------------

    def nf4_state(self) -> NF4State:
        """The layer's frozen weight as an `NF4State` (numpy copies)."""
        self._require_built("nf4_state")
        return NF4State(
            packed=np.asarray(self.nf4_packed.numpy()),
            absmax=np.asarray(self.nf4_absmax.numpy()),
            shape=self.kernel_2d_shape,
            block_size=self.state_block_size,
            quant_type=self.quant_type,
            absmax_scale=(
                None
                if self.nf4_absmax_scale is None
                else np.asarray(self.nf4_absmax_scale.numpy())
            ),
            absmax_offset=(
                None
                if self.nf4_absmax_offset is None
                else float(self.nf4_absmax_offset.numpy())
            ),
        )

    def set_nf4_state(self, state: NF4State):
        """Loads an `NF4State` with this layer's shape and settings."""
        self._require_built("set_nf4_state")
        if not isinstance(state, NF4State):
            raise TypeError(
                f"Layer '{self.name}': set_nf4_state expects an NF4State. "
                f"Received: {type(state)}"
            )
        want = (
            self.kernel_2d_shape,
            self.state_block_size,
            self.double_quant,
            self.quant_type,
        )
        got = (
            state.shape,
            state.block_size,
            state.double_quant,
            state.quant_type,
        )
        if want != got:
            raise ValueError(
                f"Layer '{self.name}' holds (shape, block_size, "
                f"double_quant, quant_type)={want}; the NF4State has {got}."
            )
        self.nf4_packed.assign(state.packed)
        self.nf4_absmax.assign(state.absmax)
        if state.double_quant:
            self.nf4_absmax_scale.assign(state.absmax_scale)
            self.nf4_absmax_offset.assign(np.float32(state.absmax_offset))

    # -- serialization ------------------------------------------------------

    def _variable_table(self):
        """(name, variable) pairs that save and load both walk, in order.

        Extra adapters come last, as `lora_a.<name>` / `lora_b.<name>`.
        """
        names = [
            "nf4_packed",
            "nf4_absmax",
            "nf4_absmax_scale",
            "nf4_absmax_offset",
            "bias",
            "lora_a",
            "lora_b",
        ]
        table = [(n, getattr(self, n, None)) for n in names]
        for name in self._extra_adapters:
            lora_a, lora_b = self.adapter_variables(name)
            table += [(f"lora_a.{name}", lora_a), (f"lora_b.{name}", lora_b)]
        return [(n, v) for n, v in table if v is not None]

    def save_own_variables(self, store):
        if not self.built:
            return
        values = {n: v.numpy() for n, v in self._variable_table()}
        for name, value in values.items():
            store[name] = value
        store[saved_checksum.KEY] = saved_checksum.digest(values)
        if self._extra_adapters or not self.lora_enabled:
            active = self.adapter_names.index(self.active_adapter)
            store[_STATE_KEY] = np.array(
                [active, int(self.lora_enabled)], "int32"
            )

    def load_own_variables(self, store):
        keys = set(store.keys())
        first = self.__dict__.get("_load_error")
        if first is not None and not keys:
            # Keras retries a layer that failed to load under another path
            # of the model, where the store is empty, and reports the last
            # error: keep reporting the one that says what is wrong.
            raise first
        try:
            self._load_checked(store, keys)
        except ValueError as err:
            self._load_error = err
            raise
        self._load_error = None

    def _load_checked(self, store, keys):
        new = self._saved_adapters(keys) - set(self._extra_adapters)
        if new and self.rank is None:
            raise ValueError(
                f"Layer '{self.name}' has no LoRA (rank=None) but the file "
                f"holds adapters {sorted(new)} for it."
            )
        # Extra adapters in the file that this layer lacks are created, but
        # only once everything has been checked (no partial load).
        table = [(n, v.shape) for n, v in self._variable_table()]
        for name in sorted(new):
            keys_ab = (f"lora_a.{name}", f"lora_b.{name}")
            table += zip(keys_ab, self._pair_shapes(), strict=True)
        missing = [n for n, _ in table if n not in keys]
        if missing:
            raise ValueError(
                f"Layer '{self.name}' cannot load its weights: the file has "
                f"no {missing}. It has {sorted(keys)}. Was it saved "
                "with the same apply() settings?"
            )
        for name, shape in table:
            value = np.asarray(store[name])
            if tuple(value.shape) != tuple(shape):
                raise ValueError(
                    f"Layer '{self.name}': saved '{name}' has shape "
                    f"{value.shape}, the layer expects {tuple(shape)}."
                )
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(
                    f"Layer '{self.name}': saved '{name}' holds NaN or Inf "
                    "values; the file is corrupt or was saved from a "
                    "diverged run."
                )
        saved_checksum.check(self.name, store, keys)
        names = (DEFAULT_ADAPTER,) + tuple(
            sorted(set(self._extra_adapters) | new)
        )
        state = self._saved_state(store, keys, names)
        for name in sorted(new):
            self.add_adapter(name)
        for name, variable in self._variable_table():
            variable.assign(store[name])
        if state is not None:
            # The file says which adapter was active; otherwise trainable
            # flags are left as they are.
            self.set_adapter_state(names[state[0]], bool(state[1]))

    def get_config(self):
        config = super().get_config()
        config.update(self.settings.layer_config())
        config.update(
            {
                "bias_regularizer": keras.regularizers.serialize(
                    self.bias_regularizer
                ),
                "bias_constraint": keras.constraints.serialize(
                    self.bias_constraint
                ),
                "activity_regularizer": keras.regularizers.serialize(
                    self.activity_regularizer
                ),
            }
        )
        return config

    # -- private helpers ------------------------------------------------------

    def _saved_adapters(self, keys):
        """Extra adapter names in a weights store's keys, checked."""
        split = [key.partition(".") for key in keys]
        return {
            check_adapter_name(name)
            for head, dot, name in split
            if dot and head in ("lora_a", "lora_b")
        }

    def _saved_state(self, store, keys, names):
        """`[active index, enabled]` from the store, checked; or None."""
        if _STATE_KEY not in keys:
            return None
        state = np.asarray(store[_STATE_KEY]).tolist()
        if not (
            isinstance(state, list)
            and len(state) == 2
            and state[0] in range(len(names))
            and state[1] in (0, 1)
        ):
            raise ValueError(
                f"Layer '{self.name}': saved '{_STATE_KEY}' must be [index "
                f"of the active adapter in {list(names)}, 0 or 1]. "
                f"Received: {state!r}"
            )
        return int(state[0]), int(state[1])

    def _require_built(self, what):
        if not self.built:
            raise ValueError(
                f"Layer '{self.name}' is not built yet; build it (or call it "
                f"once) before {what}()."
            )
