"""`AdamW8bit`: Adam/AdamW whose moments are stored blockwise in 8 bits.

Block-wise 8-bit optimizer state (Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization", arXiv 2110.02861), as bitsandbytes' `Adam8bit`:
each moment tensor is flattened and cut into blocks of `block_size` values;
a block stores one float32 absmax and one uint8 code per value, the index of
the nearest entry of a 256-entry dynamic map to `value / absmax` (the signed
map for the first moment, the unsigned one for the non-negative second).
Every step dequantizes both moments, does the exact Adam/AdamW update in
float32 and quantizes them again. State costs 2 + 8 / block_size bytes per
parameter (2.03 at block 256) instead of 8.
"""

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_qlora import internals
from keras_qlora.quantizers import codes
from keras_qlora.training.blockwise8bit import dequantize_blockwise_8bit
from keras_qlora.training.blockwise8bit import quantize_blockwise_8bit
from keras_qlora.training.checks import check_count
from keras_qlora.training.checks import check_real
from keras_qlora.training.checks import is_number

# Tables as float32 numpy constants; turned into tensors inside the step so
# that each traced graph embeds them once.
_SIGNED_CODE = codes.dynamic_map()
_SIGNED_MIDS = codes.dynamic_map_midpoints()
_UNSIGNED_CODE = codes.unsigned_dynamic_map()
_UNSIGNED_MIDS = codes.unsigned_dynamic_map_midpoints()

_DEFAULT_BLOCK_SIZE = 256
_DEFAULT_MIN_8BIT_SIZE = 4096
# Values per fused update (see `batched_update`): bounds its
# float32 temporaries (the concatenated gradient, moments and step, ~10
# buffers) to ~40 MB whatever the number of LoRA parameters.
_FUSED_GROUP_SIZE = 1 << 20


@keras.saving.register_keras_serializable(package="keras_qlora")
class AdamW8bit(internals.OptimizerStepHooks, keras.optimizers.Optimizer):
    """Adam/AdamW with block-wise 8-bit moments (bitsandbytes' Adam8bit).

    The update is Keras' `AdamW` (`Adam` when `weight_decay=None`) to the
    letter: bias-corrected step size `lr * sqrt(1 - b2^t) / (1 - b1^t)`,
    `epsilon` added to `sqrt(v)`, weight decay decoupled and applied before
    the step, as `keras.optimizers.AdamW` does. Only the storage of `m` and
    `v` differs: variables with at least `min_8bit_size` elements keep them
    as uint8 codes plus one float32 absmax per `block_size` values (about 2.03
    bytes per parameter at block 256, instead of 8); smaller variables (biases,
    norms, small LoRA factors) keep float32 moments, where 8 bits would save
    little and cost precision. The update itself always runs in float32.

    Args:
        learning_rate: a float, a `LearningRateSchedule` or a callable.
        weight_decay: decoupled weight decay (as `AdamW`); None disables it
            (plain Adam).
        beta_1, beta_2, epsilon: as in `keras.optimizers.Adam`.
        amsgrad: must be False; AMSGrad needs a third, max-tracking state
            that block-wise quantization does not keep.
        block_size: values per quantization block (positive int, default
            256 as bitsandbytes).
        min_8bit_size: variables with fewer elements keep float32 moments
            (non-negative int; default 4096 as bitsandbytes; 0 quantizes
            every variable).
        **kwargs: the base optimizer's arguments (`clipnorm`, `clipvalue`,
            `global_clipnorm`, `use_ema`, `loss_scale_factor`,
            `gradient_accumulation_steps`, `name`, ...).

    Raises:
        ValueError: for `amsgrad=True`; a `block_size` outside 1 ..
            2**20 or a negative `min_8bit_size`; a float `learning_rate`,
            `epsilon` or `weight_decay` that is negative, NaN or Inf; a
            `beta_1` / `beta_2` outside [0, 1); any invalid base optimizer
            argument.
        TypeError: a hyperparameter that is not a number (a string, ...).

    Example:
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> model.compile(optimizer=AdamW8bit(1e-3), loss="mse")
    """

    def __init__(
        self,
        learning_rate=0.001,
        weight_decay=0.004,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        block_size=_DEFAULT_BLOCK_SIZE,
        min_8bit_size=_DEFAULT_MIN_8BIT_SIZE,
        name=None,
        **kwargs,
    ):
        if amsgrad:
            raise ValueError(
                "AdamW8bit does not support amsgrad: its max-tracking state "
                "is not kept in 8 bits. Use keras.optimizers.AdamW("
                f"amsgrad=True) instead. Received: amsgrad={amsgrad!r}"
            )
        check_count("block_size", block_size, minimum=1)
        check_count("min_8bit_size", min_8bit_size, minimum=0)
        if is_number(learning_rate) or not callable(learning_rate):
            # Schedules and callables are Keras' to check.
            check_real("learning_rate", learning_rate, "a float >= 0")
        check_real("beta_1", beta_1, "in [0, 1)", below_one=True)
        check_real("beta_2", beta_2, "in [0, 1)", below_one=True)
        check_real("epsilon", epsilon, "a float >= 0")
        if weight_decay is not None:
            check_real("weight_decay", weight_decay, "None or a float >= 0")
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = False
        self.block_size = int(block_size)
        self.min_8bit_size = int(min_8bit_size)

    def build(self, var_list) -> None:
        """Creates the moment state for each of `var_list`.

        Per 8-bit variable: `{path}_momentum_codes` / `_velocity_codes`
        (uint8, one per element) and `{path}_momentum_absmax` /
        `_velocity_absmax` (float32, one per block). Per small variable:
        float32 `{path}_momentum` / `{path}_velocity` of its shape.
        """
        if self.built:
            return
        super().build(var_list)
        # One entry per variable (None where not used), indexed like
        # `internals.variable_index`.
        self._m_codes, self._m_absmax = [], []
        self._v_codes, self._v_absmax = [], []
        self._m_float, self._v_float = [], []
        for variable in var_list:
            state = self._add_state(variable)
            self._m_codes.append(state.get("momentum_codes"))
            self._m_absmax.append(state.get("momentum_absmax"))
            self._v_codes.append(state.get("velocity_codes"))
            self._v_absmax.append(state.get("velocity_absmax"))
            self._m_float.append(state.get("momentum"))
            self._v_float.append(state.get("velocity"))

    def is_8bit(self, variable) -> bool:
        """Whether `variable`'s moments are stored in 8 bits.

        Raises:
            ValueError: if the optimizer is not built yet.
        """
        self._require_built("is_8bit")
        index = internals.variable_index(self, variable)
        return self._m_codes[index] is not None

    def state_bytes(self) -> int:
        """Bytes held by the moment state (codes, absmax, float moments).

        Excludes the iteration counter and learning rate, which every Keras
        optimizer has. For 8-bit variables this is
        `2 * size + 8 * ceil(size / block_size)`.

        Returns:
            The total size in bytes of all moment state variables.

        Raises:
            ValueError: if the optimizer is not built yet.

        Example:
            >>> opt = AdamW8bit(min_8bit_size=0)
            >>> opt.build([keras.Variable(np.zeros((512,), "float32"))])
            >>> opt.state_bytes()  # 2 * 512 codes + 2 * 2 absmax * 4 bytes
            1040
        """
        self._require_built("state_bytes")
        total = 0
        for group in self._state_lists():
            for v in group:
                if v is not None:
                    itemsize = np.dtype(
                        keras.backend.standardize_dtype(v.dtype)
                    )
                    total += math.prod(v.shape) * itemsize.itemsize
        return total

    @contextlib.contextmanager
    def update_step_scope(self):
        """Entered around each step's update of all variables."""
        # The step size is the same for every variable of a step: compute it
        # once per step (per traced graph) rather than once per variable.
        # Every op per variable is a graph node that the traced train step
        # keeps in memory, and this optimizer already adds many.
        self._alpha_cache = {}
        try:
            yield
        finally:
            self._alpha_cache = None

    def batched_update(self, grads_and_vars, learning_rate) -> bool:
        """Updates all variables at once; False leaves it to Keras."""
        # Keras updates one variable at a time, each with its own copy of
        # the update's ops: about 100 graph nodes per 8-bit variable, over
        # half the nodes of a QLoRA train step, and every node of the traced
        # step stays in memory for as long as the step function lives
        # (~8 KB of RSS each, traced and instantiated). Without a
        # tf.distribute strategy, all variables are updated at once: their
        # flattened gradients and moments are concatenated, the update runs
        # once on the concatenation, and only the reads, splits and writes
        # remain per variable. Block boundaries are kept (each 8-bit
        # variable is padded to whole blocks, with codes that decode to 0),
        # so the result is the same, value for value, as the per-variable
        # update.
        if tf.distribute.has_strategy() or not self._fused_update_enabled:
            return False
        self._fused_update_step(grads_and_vars, learning_rate)
        return True

    # Class attribute, so that tests can compare with the per-variable path.
    _fused_update_enabled = True

    def _fused_update_step(self, grads_and_vars, learning_rate):
        alpha = self._step_size(learning_rate)
        eight, small = [], []
        for grad, var in grads_and_vars:
            index = internals.variable_index(self, var)
            grad = tf.cast(tf.convert_to_tensor(grad), tf.float32)
            if self._m_codes[index] is not None:
                eight.append((grad, var, index))
            elif self._m_float[index] is not None:
                small.append((grad, var, index))
            else:  # no moments (overwrite-with-gradient variables)
                self.update_step(grad, var, learning_rate)
        for group in _groups(small, _FUSED_GROUP_SIZE):
            self._fused_float(group, alpha)
        for group in _groups(eight, _FUSED_GROUP_SIZE):
            self._fused_8bit(group, alpha)

    def _adam(self, g, m, v, alpha):
        """The update of `update_step`, same ops in the same order."""
        m = m + (g - m) * (1 - self.beta_1)
        v = v + (tf.square(g) - v) * (1 - self.beta_2)
        return m, v, (m * alpha) / (tf.sqrt(v) + self.epsilon)

    def _fused_float(self, entries, alpha):
        sizes = [math.prod(var.shape) for _, var, _ in entries]

        def flat(tensors):
            return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)

        m, v, step = self._adam(
            flat([g for g, _, _ in entries]),
            flat([self._m_float[i] for _, _, i in entries]),
            flat([self._v_float[i] for _, _, i in entries]),
            alpha,
        )
        parts = zip(
            entries,
            tf.split(m, sizes),
            tf.split(v, sizes),
            tf.split(step, sizes),
            strict=True,
        )
        for (_, var, i), m_i, v_i, step_i in parts:
            shape = var.shape
            self.assign_sub(var, tf.cast(tf.reshape(step_i, shape), var.dtype))
            self.assign(self._m_float[i], tf.reshape(m_i, shape))
            self.assign(self._v_float[i], tf.reshape(v_i, shape))

    def _fused_8bit(self, entries, alpha):
        bs = self.block_size
        sizes = [math.prod(var.shape) for _, var, _ in entries]
        blocks = [math.ceil(size / bs) for size in sizes]

        def padded(tensors, value=0):
            out = []
            for t, size, n in zip(tensors, sizes, blocks, strict=True):
                t = tf.reshape(t, [-1])
                if n * bs != size:
                    t = tf.pad(t, [[0, n * bs - size]], constant_values=value)
                out.append(t)
            return tf.concat(out, 0)

        def dequantize(codes_list, absmax_list, code):
            # Padding codes decode to exactly 0, as `_as_blocks`' zeros.
            zero = int(np.flatnonzero(code == 0)[0])
            q = padded(codes_list, zero)
            table = tf.constant(code, tf.float32)
            values = tf.gather(table, tf.cast(q, tf.int32))
            absmax = tf.concat(absmax_list, 0)
            return tf.reshape(
                tf.reshape(values, [-1, bs]) * tf.expand_dims(absmax, 1), [-1]
            )

        idx = [i for _, _, i in entries]
        m = dequantize(
            [self._m_codes[i] for i in idx],
            [self._m_absmax[i] for i in idx],
            _SIGNED_CODE,
        )
        v = dequantize(
            [self._v_codes[i] for i in idx],
            [self._v_absmax[i] for i in idx],
            _UNSIGNED_CODE,
        )
        g = padded([g for g, _, _ in entries])
        m, v, step = self._adam(g, m, v, alpha)
        # The whole buffer is a whole number of blocks, none shared by two
        # variables: one quantization gives every variable's codes.
        m_codes, m_absmax = quantize_blockwise_8bit(m, _SIGNED_MIDS, bs)
        v_codes, v_absmax = quantize_blockwise_8bit(v, _UNSIGNED_MIDS, bs)
        lengths = [n * bs for n in blocks]
        parts = zip(
            entries,
            sizes,
            tf.split(step, lengths),
            tf.split(m_codes, lengths),
            tf.split(v_codes, lengths),
            tf.split(m_absmax, blocks),
            tf.split(v_absmax, blocks),
            strict=True,
        )
        for (_, var, i), size, step_i, mc, vc, ma, va in parts:
            if size != step_i.shape[0]:
                step_i, mc, vc = step_i[:size], mc[:size], vc[:size]
            self.assign_sub(
                var, tf.cast(tf.reshape(step_i, var.shape), var.dtype)
            )
            self.assign(self._m_codes[i], mc)
            self.assign(self._m_absmax[i], ma)
            self.assign(self._v_codes[i], vc)
            self.assign(self._v_absmax[i], va)

    def _step_size(self, learning_rate):
        """`lr * sqrt(1 - b2^t) / (1 - b1^t)`, shared within one step."""
        # None outside `update_step_scope` (a direct `update_step` call).
        cache = getattr(self, "_alpha_cache", None)
        if cache and "alpha" in cache:
            return cache["alpha"]
        lr = ops.cast(learning_rate, "float32")
        local_step = ops.cast(self.iterations + 1, "float32")
        beta_1_power = ops.power(ops.cast(self.beta_1, "float32"), local_step)
        beta_2_power = ops.power(ops.cast(self.beta_2, "float32"), local_step)
        alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        if cache is not None:
            cache["alpha"] = alpha
        return alpha

    def update_step(self, gradient, variable, learning_rate):
        """One Adam/AdamW step for `variable` (weight decay is applied before
        this by the base optimizer, as for `keras.optimizers.AdamW`)."""
        index = internals.variable_index(self, variable)
        gradient = ops.cast(ops.convert_to_tensor(gradient), "float32")
        alpha = self._step_size(learning_rate)

        eight_bit = self._m_codes[index] is not None
        m, v = self._read_moments(index, variable.shape, eight_bit)
        # Same expressions, in the same order, as keras' Adam.update_step.
        m = ops.add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1))
        v = ops.add(
            v,
            ops.multiply(
                ops.subtract(ops.square(gradient), v), 1 - self.beta_2
            ),
        )
        # The step uses the exact new moments; only what is stored for the
        # next step is rounded, as in bitsandbytes' 8-bit kernels.
        step = ops.divide(
            ops.multiply(m, alpha), ops.add(ops.sqrt(v), self.epsilon)
        )
        self.assign_sub(variable, ops.cast(step, variable.dtype))
        self._write_moments(index, m, v, eight_bit)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
                "block_size": self.block_size,
                "min_8bit_size": self.min_8bit_size,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Keras' base replaces a serialized schedule inside `config` itself;
        # copy first so the caller's config stays reusable.
        return super().from_config(dict(config), custom_objects)

    @classmethod
    def from_optimizer(cls, optimizer, **overrides) -> "AdamW8bit":
        """An `AdamW8bit` with the hyperparameters of an Adam/AdamW.

        Only hyperparameters are copied; the moment state (if `optimizer`
        has trained) is not, so convert before training.

        Args:
            optimizer: a `keras.optimizers.Adam` / `AdamW` instance (Adam gives
                `weight_decay=None`), an `AdamW8bit`, or the string `"adam"` /
                `"adamw"` (Keras' defaults).
            **overrides: constructor arguments to set on top, e.g.
                `block_size=128` or `min_8bit_size=0`.

        Returns:
            A new, unbuilt `AdamW8bit`.

        Raises:
            ValueError: for another optimizer name, or an Adam with
                `amsgrad=True`.
            TypeError: for any other object.

        Example:
            >>> opt = AdamW8bit.from_optimizer(keras.optimizers.AdamW(2e-4))
            >>> round(float(opt.learning_rate), 6), opt.weight_decay
            (0.0002, 0.004)
        """
        if isinstance(optimizer, str):
            optimizer = _optimizer_from_name(optimizer)
        if not isinstance(optimizer, (keras.optimizers.Adam, cls)):
            raise TypeError(
                "AdamW8bit.from_optimizer supports only keras.optimizers.Adam "
                "and keras.optimizers.AdamW (or 'adam' / 'adamw') for 8-bit "
                f"state. Received: optimizer={optimizer!r} of type "
                f"{type(optimizer).__name__}"
            )
        config = optimizer.get_config()
        # A fresh optimizer gets its own name (and so its own variable paths).
        config.pop("name", None)
        # Keep the schedule or callable object itself rather than its
        # serialized form (a plain callable may not serialize at all).
        schedule = internals.learning_rate_setting(optimizer)
        if not isinstance(schedule, keras.Variable) and callable(schedule):
            config["learning_rate"] = schedule
        if config.get("amsgrad"):
            raise ValueError(
                "AdamW8bit.from_optimizer cannot convert an optimizer with "
                "amsgrad=True: AMSGrad state is not kept in 8 bits. "
                f"Received: optimizer={optimizer!r} with amsgrad=True"
            )
        config.update(overrides)
        return cls(**config)

    def _add_state(self, variable) -> dict:
        """Creates the state variables of one model variable by role."""
        if internals.overwrites_with_gradient(self, variable):
            return {}
        size = math.prod(variable.shape)
        # Named like Keras' own slots (`add_variable_from_reference`).
        path = getattr(variable, "path", None) or str(variable.name)
        prefix = path.replace("/", "_").replace(":", "_")
        with self._colocated_with(variable):
            if size < self.min_8bit_size:
                return {
                    role: self.add_variable(
                        variable.shape, dtype="float32", name=f"{prefix}_{role}"
                    )
                    for role in ("momentum", "velocity")
                }
            blocks = math.ceil(size / self.block_size)
            state = {}
            for role in ("momentum", "velocity"):
                state[f"{role}_codes"] = self.add_variable(
                    (size,), dtype="uint8", name=f"{prefix}_{role}_codes"
                )
                state[f"{role}_absmax"] = self.add_variable(
                    (blocks,), dtype="float32", name=f"{prefix}_{role}_absmax"
                )
            return state

    def _colocated_with(self, variable):
        # Under tf.distribute, keep the state on the devices of its variable,
        # as Keras' TF optimizer does for `add_variable_from_reference`.
        strategy = internals.optimizer_strategy(self)
        if strategy is None:
            return contextlib.nullcontext()
        value = (
            variable.value if isinstance(variable, keras.Variable) else variable
        )
        return strategy.extended.colocate_vars_with(value)

    def _read_moments(self, index, shape, eight_bit):
        if not eight_bit:
            return self._m_float[index], self._v_float[index]
        bs = self.block_size
        m = dequantize_blockwise_8bit(
            self._m_codes[index], self._m_absmax[index], _SIGNED_CODE, bs
        )
        v = dequantize_blockwise_8bit(
            self._v_codes[index], self._v_absmax[index], _UNSIGNED_CODE, bs
        )
        return ops.reshape(m, shape), ops.reshape(v, shape)

    def _write_moments(self, index, m, v, eight_bit):
        if not eight_bit:
            self.assign(self._m_float[index], m)
            self.assign(self._v_float[index], v)
            return
        bs = self.block_size
        m_codes, m_absmax = quantize_blockwise_8bit(m, _SIGNED_MIDS, bs)
        v_codes, v_absmax = quantize_blockwise_8bit(v, _UNSIGNED_MIDS, bs)
        self.assign(self._m_codes[index], m_codes)
        self.assign(self._m_absmax[index], m_absmax)
        self.assign(self._v_codes[index], v_codes)
        self.assign(self._v_absmax[index], v_absmax)

    def _require_built(self, method: str) -> None:
        if not self.built:
            raise ValueError(
                f"AdamW8bit.{method}() needs a built optimizer: call "
                "`optimizer.build(model.trainable_variables)` or train first."
            )

    def _state_lists(self):
        return (
            self._m_codes,
            self._m_absmax,
            self._v_codes,
            self._v_absmax,
            self._m_float,
            self._v_float,
        )


def _groups(entries, limit):
    """Consecutive runs of `(grad, var, index)` of at most `limit` values
    (a larger variable forms a group of its own)."""
    group, total = [], 0
    for entry in entries:
        size = math.prod(entry[1].shape)
        if group and total + size > limit:
            yield group
            group, total = [], 0
        group.append(entry)
        total += size
    if group:
        yield group


def _optimizer_from_name(name: str):
    key = name.lower()
    if key == "adam":
        return keras.optimizers.Adam()
    if key == "adamw":
        return keras.optimizers.AdamW()
    raise ValueError(
        "AdamW8bit.from_optimizer supports only 'adam' and 'adamw' (or "
        "keras.optimizers.Adam / AdamW instances) for 8-bit state. "
        f"Received: optimizer={name!r}"
    )
