"""The LM head and its cross-entropy by sequence chunks (training only).

A causal LM's loss needs `logits = head(hidden)`, `(batch, seq, vocab)`:
1 GB in float32 for a 256k vocabulary at 1,024 tokens, and as much again
for its gradient. Here the head is applied to `chunk_size` positions at a
time and only the per-token cross-entropy `(batch, seq)` is kept; a
`tf.custom_gradient` recomputes each chunk's logits in the backward pass
and turns them into the gradient of the hidden states (and of the head's
trainable weights, if any) right away. The per-token losses then go
through the compiled loss's own reduction and sample weights, so the loss
equals what `fit` computes from full logits (within float32 rounding).

keras_hub's causal LMs (`GPT2CausalLM`, `LlamaCausalLM`, `GemmaCausalLM`,
...) are `backbone -> backbone.token_embedding(hidden, reverse=True)`; the
head is called through its own `stateless_call`, so tied or untied
embeddings and Gemma's final logit soft cap are the layer's own.
"""

import keras
import tensorflow as tf

from keras_qlora.wrapper import unwrap


def causal_lm_parts(model):
    """`(backbone, head)` of a keras_hub CausalLM whose logits are
    `backbone.token_embedding(backbone(x), reverse=True)`.

    Args:
        model: a `QLoRAModel` or the task it wraps.

    Raises:
        ValueError: `model` is not such a task.
    """
    base = unwrap(model)
    backbone = getattr(base, "backbone", None)
    head = getattr(backbone, "token_embedding", None)
    names = {cls.__name__ for cls in type(base).__mro__}
    layers = getattr(base, "layers", [])
    ok = (
        "CausalLM" in names
        and head is not None
        and len(layers) >= 2
        and layers[-1] is head
        and layers[-2] is backbone
        and len(base.outputs) == 1
    )
    if not ok:
        raise ValueError(
            f"lm_loss_chunk_size: model '{base.name}' "
            f"({type(base).__name__}) is not a keras_hub CausalLM whose "
            "logits are `backbone.token_embedding(hidden, reverse=True)` "
            "(GPT2CausalLM, LlamaCausalLM, MistralCausalLM, GemmaCausalLM, "
            "...). Drop lm_loss_chunk_size for this model."
        )
    return backbone, head


def per_token_cross_entropy(hidden, labels, project, weights, chunk_size):
    """`sparse_softmax_cross_entropy(labels, project(hidden, weights))` per
    token, `(B, T)` float32, computed `chunk_size` positions at a time.

    Args:
        hidden: `(B, T, D)` hidden states (differentiable).
        labels: `(B, T)` int token ids.
        project: `(hidden_chunk, weights) -> logits_chunk` `(B, c, V)`.
        weights: list of tensors `project` reads (differentiable; may be
            empty).
        chunk_size: positions per chunk (int > 0).
    """
    labels = tf.cast(labels, tf.int32)
    c = int(chunk_size)

    def chunk_loss(h, w, lab):
        logits = tf.cast(project(h, w), tf.float32)
        return tf.nn.sparse_softmax_cross_entropy_with_logits(lab, logits)

    @tf.custom_gradient
    def loss(h, *w):
        t = tf.shape(h)[1]
        n = (t + c - 1) // c
        hp = _pad(h, n * c)
        lp = _pad(labels, n * c)

        def forward(i, out):
            sl = slice(None), slice(i * c, (i + 1) * c)
            return i + 1, out.write(i, chunk_loss(hp[sl], list(w), lp[sl]))

        _, out = tf.while_loop(
            lambda i, _: i < n,
            forward,
            (0, tf.TensorArray(tf.float32, n)),
            parallel_iterations=1,
        )
        values = _unchunk(out.stack())[:, :t]

        def grad(d_values):
            dp = _pad(tf.cast(d_values, tf.float32), n * c)

            def backward(i, dh, dw):
                sl = slice(None), slice(i * c, (i + 1) * c)
                hc = hp[sl]
                with tf.GradientTape() as tape:
                    tape.watch([hc] + list(w))
                    ce = chunk_loss(hc, list(w), lp[sl])
                grads = tape.gradient(
                    ce, [hc] + list(w), output_gradients=dp[sl]
                )
                pairs = zip(dw, grads[1:], strict=True)
                dw = [a + _dense(g, a) for a, g in pairs]
                return i + 1, dh.write(i, grads[0]), dw

            dw0 = [tf.zeros_like(x) for x in w]
            _, dh, dw = tf.while_loop(
                lambda i, *_: i < n,
                backward,
                (0, tf.TensorArray(h.dtype, n), dw0),
                parallel_iterations=1,
            )
            dh = _unchunk(dh.stack())[:, :t]
            return (dh, *dw)

        return values, grad

    return loss(hidden, *weights)


def causal_lm_loss(model, x, y, sample_weight, chunk_size):
    """The compiled loss of a keras_hub CausalLM, from chunked logits.

    Equals `model.compute_loss(x, y, model(x), sample_weight)` for a model
    compiled with `SparseCategoricalCrossentropy(from_logits=True)` (what
    keras_hub compiles by default), sample weights (the preprocessor's
    padding mask) and the loss's reduction included.

    Args:
        model: the compiled `QLoRAModel` (or task).
        x, y, sample_weight: a batch, as `fit` unpacks it.
        chunk_size: positions per chunk.

    Raises:
        ValueError: another loss was compiled, or there are no labels.
    """
    backbone, head = causal_lm_parts(model)
    loss_fn = _check_loss(model, y)
    hidden = backbone(x, training=True)
    trainable = list(head.trainable_variables)
    fixed = [
        tf.convert_to_tensor(v.value) for v in head.non_trainable_variables
    ]

    def project(h, weights):
        logits, _ = head.stateless_call(weights, fixed, h, reverse=True)
        return logits

    values = per_token_cross_entropy(
        hidden, y, project, [v.value for v in trainable], chunk_size
    )
    # The compiled loss's own reduction of the per-token values.
    reduce = _PerToken(
        name="chunked_lm_loss", reduction=loss_fn.reduction, dtype=loss_fn.dtype
    )
    loss = reduce(y, values, sample_weight=sample_weight)
    extra = model.losses
    if extra:
        loss = loss + tf.add_n([tf.cast(v, loss.dtype) for v in extra])
    return loss


class _PerToken(keras.losses.Loss):
    """A loss whose values are its `y_pred`: Keras' reduction of them."""

    def call(self, y_true, y_pred):
        return y_pred


def _check_loss(model, y):
    loss = getattr(model, "loss", None)
    config = loss.get_config() if isinstance(loss, keras.losses.Loss) else {}
    ok = (
        isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
        and config.get("from_logits")
        and config.get("ignore_class") is None
    )
    if not ok:
        raise ValueError(
            "lm_loss_chunk_size needs the model compiled with "
            "loss=keras.losses.SparseCategoricalCrossentropy(from_logits="
            f"True) (no ignore_class). Received: loss={loss!r}"
        )
    if y is None:
        raise ValueError(
            "lm_loss_chunk_size: fit() got no labels (y); a keras_hub "
            "CausalLM's preprocessor gives (x, y, sample_weight)."
        )
    return loss


def _pad(x, length):
    extra = length - tf.shape(x)[1]
    paddings = [[0, 0]] * x.shape.rank
    paddings[1] = [0, extra]
    return tf.pad(x, paddings)


def _unchunk(x):
    """`(n, B, c, ...)` -> `(B, n * c, ...)`."""
    x = tf.experimental.numpy.swapaxes(x, 0, 1)
    shape = tf.shape(x)
    return tf.reshape(
        x, tf.concat([[shape[0], shape[1] * shape[2]], shape[3:]], 0)
    )


def _dense(grad, like):
    if grad is None:
        return tf.zeros_like(like)
    return tf.convert_to_tensor(grad)
