"""Exact attention computed block by block (online softmax), forward and
backward, never forming the full [batch, heads, seq, seq] score tensor.

The query sequence is cut into chunks of `chunk_size` rows and the key
sequence into blocks of the same size. For one query chunk, the key blocks
are visited in order while a running maximum `m` and a running sum `l` of
`exp(score - m)` are kept per query row (the "online softmax"): when a
block raises the maximum, what was accumulated so far is rescaled by
`exp(m_old - m_new)`. After the last block, the output is the accumulated
weighted values divided by `l`, which equals softmax attention exactly (up
to float rounding). The final `m` and `l` of every row (two numbers per
query row and head) are all the forward pass keeps for the backward
pass: `tf.custom_gradient` recomputes the scores of each block from it
(flash-attention's backward), so training memory is also
O(chunk x chunk x heads) per block instead of O(seq x seq x heads).

Masking follows Keras' `Softmax(mask=...)` (which keras_hub's attention
layers use): a masked score gets -1e9 added, so a query row whose keys are
all masked comes out as Keras' does (an even average of the values), not
as NaN. The positions added to round the lengths up to whole chunks are
excluded outright.

Everything is computed in float32; the output is cast back to the query's
dtype. The loops run one chunk at a time (`parallel_iterations=1`): by
default TensorFlow overlaps up to 10 independent iterations, which would
hold 10 blocks at once.
"""

import tensorflow as tf

# What Keras' Softmax adds to masked float32 scores.
_MASKED = -1e9
# Scores of the keys added to fill the last block: never attended.
_PADDED = -1e30


def chunked_attention(
    query,
    key,
    value,
    mask=None,
    *,
    scale,
    chunk_size,
    soft_cap=None,
    causal=False,
    window=None,
    query_offset=0,
):
    """Softmax attention of `query` over `key`/`value`, by blocks.

    `softmax(scale * q.k + masks) @ v`, with grouped-query heads: query
    head `n` uses key/value head `n // (H // Hk)`, as `ops.repeat(key, H //
    Hk, axis=2)` would give.

    Args:
        query: `(B, T, H, D)`.
        key: `(B, S, Hk, D)`, `H` a multiple of `Hk`.
        value: `(B, S, Hk, Dv)`.
        mask: None, or a bool/int tensor broadcastable to `(B, T, S)`
            (axes of size 1 allowed); True / nonzero = attend.
        scale: multiplies the scores (e.g. `1 / sqrt(D)`).
        chunk_size: rows per query chunk and keys per block (int > 0).
        soft_cap: None, or `c` for Gemma's `c * tanh(scores / c)`, applied
            after scaling and before masking.
        causal: also mask keys after the query's position
            (`j > i + query_offset`).
        window: None, or a sliding window `w`: also mask keys with
            `|i + query_offset - j| >= w` (keras_hub's band of `w - 1`).
        query_offset: position of the first query row among the keys
            (int or scalar tensor).

    Returns:
        `(B, T, H, Dv)` in the query's dtype.
    """
    dtype = query.dtype
    q = tf.cast(query, tf.float32)
    k = tf.cast(key, tf.float32)
    v = tf.cast(value, tf.float32)
    if mask is None:
        mask = tf.ones((1, 1, 1), tf.bool)
    mask = tf.cast(mask, tf.bool)
    if mask.shape.rank == 2:
        mask = mask[:, None, :]
    plan = _Plan(
        chunk=int(chunk_size),
        scale=float(scale),
        soft_cap=None if soft_cap is None else float(soft_cap),
        causal=bool(causal),
        window=None if window is None else int(window),
    )
    offset = tf.cast(query_offset, tf.int32)
    out = _attention(plan, q, k, v, mask, offset)
    return tf.cast(out, dtype)


class _Plan:
    """The static settings of one chunked attention (Python values)."""

    def __init__(self, chunk, scale, soft_cap, causal, window):
        self.chunk = chunk
        self.scale = scale
        self.soft_cap = soft_cap
        self.causal = causal
        self.window = window


def _attention(plan, q, k, v, mask, offset):
    @tf.custom_gradient
    def attend(q, k, v):
        out, stats = _forward(plan, q, k, v, mask, offset)

        def grad(d_out):
            dq, dk, dv = _backward(
                plan, q, k, v, mask, offset, out, stats, d_out
            )
            return dq, dk, dv

        return out, grad

    return attend(q, k, v)


def _pad_to(x, length, axis=1):
    """`x` zero-padded along `axis` (the sequence) to `length`."""
    extra = length - tf.shape(x)[axis]
    paddings = [[0, 0]] * x.shape.rank
    paddings[axis] = [0, extra]
    return tf.pad(x, paddings)


def _geometry(plan, q, k):
    c = plan.chunk
    t, s = tf.shape(q)[1], tf.shape(k)[1]
    nq = (t + c - 1) // c
    nk = (s + c - 1) // c
    return t, s, nq, nk


def _grouped(q, k):
    """`q` `(B, c, H, D)` -> `(B, c, Hk, G, D)`."""
    b, c, h, d = tf.unstack(tf.shape(q))
    hk = tf.shape(k)[2]
    return tf.reshape(q, [b, c, hk, h // hk, d])


def _block_allowed(plan, mask, offset, qi, kj, t, s):
    """Which (query, key) pairs of block (qi, kj) may attend, `(B, c, c)`,
    and which keys are real (not padding), `(c,)`."""
    c = plan.chunk
    rows = qi * c + tf.range(c)
    cols = kj * c + tf.range(c)
    # Gather the block from a mask whose axes may have size 1 (or be
    # shorter than the padded lengths): clamp the indices.
    m = tf.gather(mask, tf.minimum(rows, tf.shape(mask)[1] - 1), axis=1)
    m = tf.gather(m, tf.minimum(cols, tf.shape(mask)[2] - 1), axis=2)
    pos = rows[:, None] + offset
    if plan.causal:
        m = tf.logical_and(m, cols[None, :] <= pos)
    if plan.window is not None:
        m = tf.logical_and(m, tf.abs(pos - cols[None, :]) < plan.window)
    return m, cols < s


def _scores(plan, qc, kc, allowed, real):
    """Masked scores of one block, `(B, Hk, G, c, c)`, and the derivative
    of the soft cap (None without one)."""
    raw = tf.einsum("bqkgd,bskd->bkgqs", qc, kc)
    dcap = None
    if plan.soft_cap is not None:
        t = tf.tanh(raw / plan.soft_cap)
        raw = plan.soft_cap * t
        dcap = 1.0 - tf.square(t)
    adder = tf.where(allowed, 0.0, _MASKED)[:, None, None, :, :]
    scores = raw + adder
    scores = tf.where(real[None, None, None, None, :], scores, _PADDED)
    return scores, dcap


def _forward(plan, q, k, v, mask, offset):
    c = plan.chunk
    t, s, nq, nk = _geometry(plan, q, k)
    qp = _pad_to(q, nq * c) * plan.scale
    kp = _pad_to(k, nk * c)
    vp = _pad_to(v, nk * c)
    b, hk, dv = tf.shape(q)[0], tf.shape(k)[2], tf.shape(v)[3]
    g = tf.shape(q)[2] // hk

    def query_chunk(qi, outs, stats):
        qc = _grouped(qp[:, qi * c : (qi + 1) * c], k)

        def key_block(kj, m, total, acc):
            kc = kp[:, kj * c : (kj + 1) * c]
            vc = vp[:, kj * c : (kj + 1) * c]
            allowed, real = _block_allowed(plan, mask, offset, qi, kj, t, s)
            scores, _ = _scores(plan, qc, kc, allowed, real)
            m_new = tf.maximum(m, tf.reduce_max(scores, axis=-1))
            p = tf.exp(scores - m_new[..., None])
            rescale = tf.exp(m - m_new)
            total = total * rescale + tf.reduce_sum(p, axis=-1)
            acc = acc * rescale[..., None] + tf.einsum(
                "bkgqs,bskv->bkgqv", p, vc
            )
            return kj + 1, m_new, total, acc

        m0 = tf.fill([b, hk, g, c], -float("inf"))
        l0 = tf.zeros([b, hk, g, c])
        acc0 = tf.zeros([b, hk, g, c, dv])
        _, m, total, acc = tf.while_loop(
            lambda kj, *_: kj < nk,
            key_block,
            (0, m0, l0, acc0),
            parallel_iterations=1,
        )
        out = acc / total[..., None]  # (B, Hk, G, c, Dv)
        out = tf.reshape(tf.transpose(out, [0, 3, 1, 2, 4]), [b, c, -1, dv])
        # The row statistics, kept apart: m + log(total) would round away
        # log(total) in a row whose scores are all near -1e9 (all masked).
        row = tf.stack([m, total])  # (2, B, Hk, G, c)
        return qi + 1, outs.write(qi, out), stats.write(qi, row)

    outs = tf.TensorArray(tf.float32, size=nq)
    stats = tf.TensorArray(tf.float32, size=nq)
    _, outs, stats = tf.while_loop(
        lambda qi, *_: qi < nq,
        query_chunk,
        (0, outs, stats),
        parallel_iterations=1,
    )
    # (nq, B, c, H, Dv) -> (B, T, H, Dv)
    out = outs.stack()
    out = tf.transpose(out, [1, 0, 2, 3, 4])
    out = tf.reshape(out, [b, nq * c, -1, dv])[:, :t]
    return out, stats.stack()  # (nq, 2, B, Hk, G, c): max and sum


def _backward(plan, q, k, v, mask, offset, out, stats, d_out):
    """Gradients of `_forward`'s output, recomputing each block's scores."""
    c = plan.chunk
    t, s, nq, nk = _geometry(plan, q, k)
    qp = _pad_to(q, nq * c) * plan.scale
    kp = _pad_to(k, nk * c)
    vp = _pad_to(v, nk * c)
    d_out = tf.cast(d_out, tf.float32)
    dop = _pad_to(d_out, nq * c)
    # Per query row and head: sum(d_out * out) = sum_j p_j dp_j.
    delta = _pad_to(tf.reduce_sum(d_out * out, axis=-1), nq * c)  # (B, T', H)
    b, hk = tf.shape(q)[0], tf.shape(k)[2]
    g = tf.shape(q)[2] // hk
    d = tf.shape(q)[3]

    def query_chunk(qi, dqs, dk, dv):
        qc = _grouped(qp[:, qi * c : (qi + 1) * c], k)
        doc = _grouped(dop[:, qi * c : (qi + 1) * c], k)  # (B, c, Hk, G, Dv)
        dl = tf.reshape(delta[:, qi * c : (qi + 1) * c], [b, c, hk, g])
        dl = tf.transpose(dl, [0, 2, 3, 1])  # (B, Hk, G, c)
        row_max, row_sum = tf.unstack(stats[qi])

        def key_block(kj, dq, dk, dv):
            kc = kp[:, kj * c : (kj + 1) * c]
            vc = vp[:, kj * c : (kj + 1) * c]
            allowed, real = _block_allowed(plan, mask, offset, qi, kj, t, s)
            scores, dcap = _scores(plan, qc, kc, allowed, real)
            # (B, Hk, G, c, c)
            p = tf.exp(scores - row_max[..., None]) / row_sum[..., None]
            dv_block = tf.einsum("bkgqs,bqkgv->bskv", p, doc)
            dp = tf.einsum("bqkgv,bskv->bkgqs", doc, vc)
            ds = p * (dp - dl[..., None])
            if dcap is not None:
                ds = ds * dcap
            dq = dq + tf.einsum("bkgqs,bskd->bqkgd", ds, kc)
            dk_block = tf.einsum("bkgqs,bqkgd->bskd", ds, qc)
            index = [[kj]]
            dk = tf.tensor_scatter_nd_add(dk, index, dk_block[None])
            dv = tf.tensor_scatter_nd_add(dv, index, dv_block[None])
            return kj + 1, dq, dk, dv

        dq0 = tf.zeros([b, c, hk, g, d])
        _, dq, dk, dv = tf.while_loop(
            lambda kj, *_: kj < nk,
            key_block,
            (0, dq0, dk, dv),
            parallel_iterations=1,
        )
        dq = tf.reshape(dq, [b, c, hk * g, d]) * plan.scale
        return qi + 1, dqs.write(qi, dq), dk, dv

    dqs = tf.TensorArray(tf.float32, size=nq)
    dk0 = tf.zeros([nk, b, c, hk, d])
    dv0 = tf.zeros([nk, b, c, hk, tf.shape(v)[3]])
    _, dqs, dk, dv = tf.while_loop(
        lambda qi, *_: qi < nq,
        query_chunk,
        (0, dqs, dk0, dv0),
        parallel_iterations=1,
    )
    dq = _unchunk(dqs.stack())[:, :t]
    dk = _unchunk(dk)[:, :s]
    dv = _unchunk(dv)[:, :s]
    return dq, dk, dv


def _unchunk(x):
    """`(n, B, c, H, D)` -> `(B, n * c, H, D)`."""
    shape = tf.shape(x)
    x = tf.transpose(x, [1, 0, 2, 3, 4])
    return tf.reshape(x, [shape[1], shape[0] * shape[2], shape[3], shape[4]])
