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
from keras_qlora.chunked import lm_loss


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


def lora_train_step(model, data, variables, lm_loss_chunk_size=None):
    """One optimizer step on `variables`; returns the metric results.

    Mirrors `keras.Model.train_step` on TensorFlow (loss scaling for
    mixed_float16, tf.distribute loss scaling, metrics), except for the
    explicit variable list.

    With `lm_loss_chunk_size` (a keras_hub CausalLM), the loss comes from
    `chunked.lm_loss.causal_lm_loss`: the logits are never formed in full,
    so only the loss is tracked; compiled metrics of the logits (e.g.
    keras_hub's default accuracy) are not updated (`evaluate` computes
    them).
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    y_pred = None
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch([v.value for v in variables])
        if lm_loss_chunk_size is None:
            y_pred = model(x, training=True)
            loss = internals.compute_loss(
                model,
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=True,
            )
        else:
            loss = lm_loss.causal_lm_loss(
                model, x, y, sample_weight, lm_loss_chunk_size
            )
        batch = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))
        internals.track_loss(model, loss, batch_size=batch[0])
        loss = model.optimizer.scale_loss(loss)
    grads = tape.gradient(loss, variables)
    model.optimizer.apply(grads, variables)
    if y_pred is None:
        return model.get_metrics_result()
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
