"""The LoRA-only training step of a QLoRA model (TensorFlow backend).

Keras' default step differentiates with respect to every trainable weight.
Here the step differentiates with respect to an explicit list — the LoRA
matrices plus what the user opted in (`modules_to_save`, `bias=`, layers
they unfroze themselves) — and checks once that none of the frozen 4-bit
state is in it. The tape watches only those variables, so no gradient is
ever formed for a 4-bit weight, and the optimizer builds slots for those
variables alone.
"""

import keras
import tensorflow as tf

from keras_qlora import internals


def trained_variables(model, frozen_ids):
    """The variables `train_step` updates, in `model.trainable_variables`
    order.

    Args:
        model: the model being trained.
        frozen_ids: ids of variables that must never train (NF4 state).

    Raises:
        ValueError: no trainable variables, or a 4-bit variable was made
            trainable (e.g. by `layer.trainable = True` on a QLoRA layer).
    """
    variables = list(model.trainable_variables)
    bad = [v.path for v in variables if id(v) in frozen_ids]
    if bad:
        raise ValueError(
            f"Model '{model.name}': the frozen 4-bit weights {bad[:4]} are "
            "marked trainable. NF4 weights cannot be trained; only LoRA "
            "matrices, biases and modules_to_save can. Set trainable=False "
            "on those variables (or their layers)."
        )
    if not variables:
        raise ValueError(
            f"Model '{model.name}' has nothing to train: no LoRA adapter or "
            "opted-in variable is trainable. Did apply() get "
            "target_modules=None (or ones that matched nothing), were the "
            "adapters disabled (keras_qlora.disable_adapters: call "
            "enable_adapters first) or frozen?"
        )
    return variables


def lora_train_step(model, data, variables):
    """One optimizer step on `variables`; returns the metric results.

    Mirrors `keras.Model.train_step` on TensorFlow (loss scaling for
    mixed_float16, tf.distribute loss scaling, metrics), except for the
    explicit variable list.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch([v.value for v in variables])
        y_pred = model(x, training=True)
        loss = internals.compute_loss(
            model,
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=True,
        )
        batch = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))
        internals.track_loss(model, loss, batch_size=batch[0])
        loss = model.optimizer.scale_loss(loss)
    grads = tape.gradient(loss, variables)
    model.optimizer.apply(grads, variables)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
