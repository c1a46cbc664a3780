"""`HostOffloadOptimizer`: optimizer state and update math in host memory.

QLoRA keeps the optimizer state off the accelerator (bitsandbytes pages it
to CPU RAM). Here the wrapped optimizer's slot variables (Adam's moments,
...) are created on the host, and each step:

1. copies the gradients and the current values of the trained variables to
   the host (device -> host: a few MB for LoRA);
2. runs the wrapped optimizer's update there, on host copies of the
   variables (the "host mirrors");
3. assigns the updated values back to the device variables (host -> device).

The mirrors are refreshed from the device variables on every step, so
restoring weights (`load_weights`, `load_adapter`) between steps is safe;
they are working buffers, not state, and are not checkpointed. The update
is the wrapped optimizer's own, so the trajectory equals plain training.

On a CPU-only machine host and device are the same, and the same code path
runs (the slots are still placed on the host device explicitly).
"""

import keras
import tensorflow as tf

from keras_qlora import internals

# Optimizers whose state is one set of slots per variable, updated
# elementwise: these can be moved to the host unchanged.
_SUPPORTED = (
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "AdamW8bit",
    "Adamax",
    "Ftrl",
    "Lamb",
    "Lion",
    "Nadam",
    "RMSprop",
    "SGD",
)


@keras.saving.register_keras_serializable(package="keras_qlora")
class HostOffloadOptimizer(keras.optimizers.Optimizer):
    """Wraps an optimizer so its state lives and updates on the host CPU.

    Args:
        inner_optimizer: a Keras optimizer instance (Adam, AdamW, SGD, ...,
            or `keras_qlora.training.AdamW8bit`) or its string name.
        host_device: the TF device holding the state; default "/CPU:0".
        name: optimizer name.

    Raises:
        TypeError: the inner optimizer is not a supported Keras optimizer
            (or is a `HostOffloadOptimizer` already); `host_device` is not
            a string.
        ValueError: an unknown optimizer name; a `host_device` that is
            empty, malformed or absent from this machine; used under a
            `tf.distribute` strategy (per-replica host state is not
            implemented); asked to update variables other than those it
            was built for (recompile after `set_adapter`).

    Example:
    >>> opt = HostOffloadOptimizer(keras.optimizers.AdamW(1e-3))
    >>> model.compile(optimizer=opt, loss="mse")  # doctest: +SKIP
    """

    def __init__(self, inner_optimizer, host_device="/CPU:0", name=None):
        inner = resolve_optimizer(
            inner_optimizer, "HostOffloadOptimizer(inner_optimizer=...)"
        )
        check_offloadable(inner)
        if not isinstance(host_device, str):
            raise TypeError(
                "HostOffloadOptimizer: host_device must be a TF device "
                f"string such as '/CPU:0'. Received: host_device="
                f"{host_device!r}"
            )
        if not host_device.strip():
            raise ValueError(
                "HostOffloadOptimizer: host_device must name a device, such "
                f"as '/CPU:0'. Received: host_device={host_device!r}"
            )
        _check_device(host_device)
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner
        self.host_device = host_device
        self._mirrors = []

    # -- build ----------------------------------------------------------------

    def build(self, var_list):
        _refuse_distribution()
        # Keras builds the optimizer lazily, inside the first trace of the
        # train function. A `tf.Variable` created there from another
        # variable's value cannot have its initializer lifted out of the
        # graph, so `tf.function` wraps the step in a cond between an
        # initializing and a regular trace: the whole train step is traced
        # and held twice over (about twice the tracing time, and some
        # 0.4 GiB more peak RSS on an 8-layer GPT-2-medium). Creating the
        # mirrors eagerly, as Keras creates its own variables, avoids it.
        with tf.init_scope(), tf.device(self.host_device):
            self._mirrors = [
                tf.Variable(
                    _value(v),
                    trainable=False,
                    name=_base_name(v) + "_host",
                )
                for v in var_list
            ]
            # Slots are colocated with the variables they are built for:
            # building on the host mirrors puts them on the host.
            self.inner_optimizer.build(self._mirrors)
        self._device_vars = list(var_list)
        self.built = True

    # -- properties -----------------------------------------------------------

    @property
    def variables(self):
        own = internals.optimizer_own_variables(self)
        return own + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        # Called by the base constructor before `inner_optimizer` exists.
        if "inner_optimizer" in self.__dict__:
            self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def host_variables(self):
        """The optimizer state variables (all on `host_device`)."""
        return list(self.inner_optimizer.variables)

    # -- update ----------------------------------------------------------------

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if trainable_variables is None:
            trainable_variables = self._device_vars
        trainable_variables = list(trainable_variables)
        if not self.built:
            self.build(trainable_variables)
        self._check_same_variables(trainable_variables)
        with tf.device(self.host_device):
            host_grads = []
            for g, v, m in zip(
                grads, trainable_variables, self._mirrors, strict=True
            ):
                m.assign(_value(v))  # device -> host
                host_grads.append(None if g is None else tf.identity(g))
            self.inner_optimizer.apply(host_grads, self._mirrors)
        for v, m in zip(trainable_variables, self._mirrors, strict=True):
            v.assign(m.read_value())  # host -> device

    def _check_same_variables(self, variables):
        # The host slots belong to the variables the optimizer was built
        # for: updating others (e.g. another adapter after set_adapter)
        # would carry one variable's moments over to another.
        built = [id(v) for v in self._device_vars]
        if [id(v) for v in variables] == built:
            return
        known = set(built)
        new = [_base_name(v) for v in variables if id(v) not in known]
        raise ValueError(
            f"{type(self).__name__} was built for {len(built)} variables "
            f"and is now asked to update {len(variables)}, "
            f"{len(new)} of them new ({new[:4]}). Its state belongs to the "
            "variables it was built for: recompile the model (or create a "
            "new optimizer) after changing which variables are trainable "
            "(e.g. set_adapter, add_adapter, layer.trainable)."
        )

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        # EMA (if the inner optimizer uses it) lives on the mirrors.
        if self.inner_optimizer.use_ema:
            self.inner_optimizer.finalize_variable_values(self._mirrors)
            for v, m in zip(var_list, self._mirrors, strict=True):
                v.assign(m.read_value())

    # -- config ----------------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
            "host_device": self.host_device,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)


def _check_device(host_device):
    """Refuses a device this machine does not have (TF would otherwise
    place the state elsewhere without a word, with soft placement)."""
    try:
        spec = tf.DeviceSpec.from_string(host_device)
    except ValueError as err:
        raise ValueError(
            f"HostOffloadOptimizer: host_device={host_device!r} is not a TF "
            f"device string ({err}). Use e.g. '/CPU:0'."
        ) from None
    kind = (spec.device_type or "CPU").upper()
    index = spec.device_index or 0
    names = [
        d.name
        for d in tf.config.list_logical_devices()
        if d.device_type == kind
    ]
    if index >= len(names):
        have = [d.name for d in tf.config.list_logical_devices()]
        raise ValueError(
            f"HostOffloadOptimizer: host_device={host_device!r} does not "
            f"exist on this machine. Its devices: {have}"
        )


def resolve_optimizer(value, argument):
    """A Keras optimizer from an instance, a name ("adam") or a serialized
    config, as `keras.optimizers.get` (None stays None), with errors that
    name `argument`.

    Raises:
        TypeError: `value` is none of those; ValueError: an unknown name
            or a config Keras cannot deserialize.
    """
    if value is None or isinstance(value, keras.optimizers.Optimizer):
        return value  # None: as Keras (compile without an optimizer)
    if not isinstance(value, (str, dict)):
        raise TypeError(
            f"{argument} must be a Keras optimizer instance "
            "(keras.optimizers.*), its name (e.g. 'adamw') or its config. "
            f"Received: {type(value).__module__}.{type(value).__name__} "
            f"{value!r}"[:400]
        )
    try:
        return keras.optimizers.get(value)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{argument}: {value!r} is not an optimizer Keras knows "
            f"({type(err).__name__}: {err}). Use e.g. 'adamw' or "
            "keras.optimizers.AdamW(...)."
        ) from None


def check_offloadable(optimizer):
    """Raises unless `optimizer` can have its state moved to the host."""
    name = type(optimizer).__name__
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "offload_optimizer needs a Keras optimizer (keras.optimizers.*). "
            f"Received: {type(optimizer).__module__}.{name}"
        )
    if isinstance(optimizer, HostOffloadOptimizer):
        raise TypeError(
            "HostOffloadOptimizer: the optimizer to offload is already a "
            "HostOffloadOptimizer; wrap the plain optimizer once. Received: "
            f"HostOffloadOptimizer({type(optimizer.inner_optimizer).__name__})"
        )
    if name not in _SUPPORTED:
        raise TypeError(
            f"offload_optimizer does not support {name}: supported are "
            f"{', '.join(_SUPPORTED)} (optimizers with per-variable, "
            "elementwise state). Mixed-precision loss scaling is added by "
            "Keras on top; pass the plain optimizer."
        )


def _refuse_distribution():
    if tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
        raise ValueError(
            "offload_optimizer=True is not supported under "
            f"{type(strategy).__name__}: host-resident optimizer state is "
            "implemented for single-device training. Train without "
            "offload_optimizer under tf.distribute."
        )


def _value(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def _base_name(variable):
    name = getattr(variable, "path", None) or variable.name
    return name.replace("/", "_").replace(":", "_")
