"""The ``chunked`` attention backend (the CPU's): softmax attention in blocks, with its own backward pass.

Flash attention's algorithm written in XLA ops, for XLA:CPU, where no fused kernel exists:

* forward: queries in blocks; each block's logits, softmax and output, keeping only the output and
  each query's log-sum-exp (``[B, heads, T]``), never a ``[B, heads, T, S]`` array;
* backward (:func:`jax.custom_vjp`): dQ over query blocks and dK, dV over *key* blocks, each from
  the recomputed probabilities ``exp(logits - lse)`` and ``dS = P * (dP - rowsum(dO * O))``.

Why written by hand rather than left to ``jax.grad`` of the blocked forward: autodiff of a
query-blocked softmax accumulates dK and dV as ``P^T @ dO`` contracted over each query block, which
XLA:CPU runs as many small transposed matmuls (the small config's 1,024-token layers were 82 % of its
step, 65 % in their backward pass); and it differentiates through max and division, more passes
over each block. Here every block is ``matmul -> elementwise -> matmul`` with a plain
(untransposed) contraction, the shape XLA:CPU's YNNPACK fusions take whole. Measured on a 2-core
CPU: ``benchmarks/results/attention_cpu.jsonl``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_inversion.core.platform import CHUNK_QUERIES

F32 = jnp.float32


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """``[B, H, T, ...]`` -> ``[T // block, B, H, block, ...]`` (the axis ``lax.map`` walks)."""
    batch, heads, length = x.shape[:3]
    return jnp.moveaxis(x.reshape(batch, heads, length // block, block, *x.shape[3:]), 2, 0)


def _unblocks(x: jax.Array) -> jax.Array:
    """The inverse of :func:`_blocks`."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], *x.shape[4:])


LOGITS_BLOCK_BYTES = 16 * 2**20  # one block's float32 logits, all batch rows and heads together


def block_length(batch: int, heads: int, other_length: int, cap: int) -> int:
    """Queries (keys) per block: the largest power of two up to ``cap`` whose float32 logits against
    ``other_length`` keys (queries) fit :data:`LOGITS_BLOCK_BYTES`, at least 16.

    Measured on a 2-core CPU: XLA:CPU's fused block (matmul, softmax, matmul) slows several-fold once a
    block's logits outgrow the cache (the small config's 1,024-token layer, 64 (batch row, head) pairs:
    205 ms forward at 128 queries, 36 ms at 32), while SD1.5's layers (one row, 8 heads) run fastest
    at 128.
    """
    length = cap
    while length > 16 and batch * heads * length * other_length * 4 > LOGITS_BLOCK_BYTES:
        length //= 2
    return length


def _map_blocks(fn, xs: tuple, length: int, block: int):
    """``fn(pieces, start)`` over ``block``-sized pieces of ``xs`` (arrays ``[B, H, length, ...]``) along
    axis 2, its outputs' pieces joined back; one call on the whole arrays where ``block`` does not
    divide ``length`` into several blocks."""
    if length <= block or length % block:
        return fn(xs, 0)
    starts = jnp.arange(length // block) * block
    out = jax.lax.map(lambda args: fn(*args), (tuple(_blocks(x, block) for x in xs), starts))
    return jax.tree_util.tree_map(_unblocks, out)


def _logits(rows: jax.Array, columns: jax.Array, causal: bool, row_start, column_start, rows_are_queries: bool = True):
    """Scaled float32 logits ``rows @ columns^T``: ``[B, H, queries, keys]`` (or, with
    ``rows_are_queries`` false, ``[B, H, keys, queries]``, computed in that layout rather than
    transposed). With ``causal``, keys after their query get ``-inf``'s finite stand-in (probability
    exactly zero); ``row_start``/``column_start`` place the blocks in the sequence."""
    logits = jnp.matmul(rows, jnp.swapaxes(columns, -1, -2), preferred_element_type=F32) * rows.shape[-1] ** -0.5
    if causal:
        row_positions = (row_start + jnp.arange(rows.shape[2]))[:, None]
        column_positions = (column_start + jnp.arange(columns.shape[2]))[None, :]
        visible = column_positions <= row_positions if rows_are_queries else row_positions <= column_positions
        logits = jnp.where(visible, logits, jnp.finfo(F32).min)
    return logits


def _forward(q, k, v, causal: bool, block: int):
    """Output ``[B, H, T, D]`` and each query's log-sum-exp ``[B, H, T, 1]`` (float32; the trailing axis
    broadcasts against a block's logits and lets the blocks split it like ``q``)."""

    def attend(pieces, q_start):
        (q_block,) = pieces
        logits = _logits(q_block, k, causal, q_start, 0)
        peak = jnp.max(logits, axis=-1, keepdims=True)
        weights = jnp.exp(logits - peak)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        out = jnp.matmul(weights.astype(v.dtype), v, preferred_element_type=F32) / total
        return out.astype(q.dtype), peak + jnp.log(total)

    return _map_blocks(attend, (q,), q.shape[2], block_length(*q.shape[:2], k.shape[2], block))


ROWS_PER_GROUP = 16  # at least this many (batch row, head) pairs per independent group
MAX_GROUPS = 4


def row_groups(batch: int, heads: int) -> int:
    """Independent groups the ``batch * heads`` attention rows split into: ``rows // ROWS_PER_GROUP``,
    at most :data:`MAX_GROUPS`, a divisor of ``batch`` or of ``heads``, at least 1.

    XLA:CPU runs a block's fused ops on one core, but independent ops on all of them: on 2 cores the
    small config's step (64 pairs per layer) ran 0.70-0.75 -> 0.52-0.56 s in 4 groups, while SD1.5's 8 rows gain nothing
    from splitting.
    """
    rows = batch * heads
    groups = max(1, min(MAX_GROUPS, rows // ROWS_PER_GROUP))
    while batch % groups and heads % groups:
        groups -= 1
    return groups


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False,
                      block: int = CHUNK_QUERIES) -> jax.Array:
    """Softmax attention over heads-major ``[B, heads, T, dim]`` arrays, a block of queries (and, in the
    backward pass, of keys) at a time; a length the block does not divide runs as one block. The
    ``(batch row, head)`` pairs run in :func:`row_groups` independent groups. Attention whose whole
    logits fit :data:`LOGITS_BLOCK_BYTES` runs unblocked, differentiated by ``jax.grad``.

    Args:
      q, k, v: queries ``[B, H, T, D]``, keys and values ``[B, H, S, D]``, one dtype.
      causal: mask keys after each query (the CLIP text encoder).
      block: the most queries (keys) per block; fewer where a block's logits would outgrow
        :data:`LOGITS_BLOCK_BYTES` (:func:`block_length`).

    Returns:
      ``[B, H, T, D]`` in ``q``'s dtype; logits and softmax are float32 whatever the input dtype.
    """
    batch, heads = q.shape[:2]
    if batch * heads * q.shape[2] * k.shape[2] * 4 <= LOGITS_BLOCK_BYTES:
        return _whole_attention(q, k, v, causal)
    groups = row_groups(batch, heads)
    if groups == 1:
        return _attention_group(q, k, v, causal, block)
    axis = 0 if batch % groups == 0 else 1  # split batch rows where they divide, else heads
    pieces = [jnp.split(t, groups, axis=axis) for t in (q, k, v)]
    return jnp.concatenate([_attention_group(*group, causal, block) for group in zip(*pieces)], axis=axis)


def _whole_attention(q, k, v, causal: bool) -> jax.Array:
    """Attention with all logits at once, differentiated by ``jax.grad``: for layers whose whole logits fit
    one block's budget (SD1.5's 16x16 layer at 256 px: 5.4 ms forward+backward, against 9.2 ms blocked)."""
    probs = jax.nn.softmax(_logits(q, k, causal, 0, 0), axis=-1)
    return jnp.matmul(probs.astype(v.dtype), v, preferred_element_type=F32).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention_group(q, k, v, causal, block):
    """:func:`blocked_attention` of one group, with the backward pass below."""
    return _forward(q, k, v, causal, block)[0]


def _attention_group_fwd(q, k, v, causal, block):
    out, lse = _forward(q, k, v, causal, block)
    return out, (q, k, v, out, lse)


def _attention_group_bwd(causal, block, residuals, d_out):
    q, k, v, out, lse = residuals
    delta = jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1, keepdims=True)  # rowsum(dO * O), [B, H, T, 1]
    lse_t, delta_t = jnp.swapaxes(lse, -1, -2), jnp.swapaxes(delta, -1, -2)  # [B, H, 1, T]: per query, along a key row
    scale = q.shape[-1] ** -0.5

    def d_query(pieces, q_start):  # one query block against every key
        q_block, d_out_block, lse_block, delta_block = pieces
        probs = jnp.exp(_logits(q_block, k, causal, q_start, 0) - lse_block)
        d_probs = jnp.matmul(d_out_block, jnp.swapaxes(v, -1, -2), preferred_element_type=F32)
        d_logits = probs * (d_probs - delta_block) * scale
        return (jnp.matmul(d_logits.astype(k.dtype), k, preferred_element_type=F32).astype(q.dtype),)

    def d_key_value(pieces, k_start):  # one key block against every query, transposed: [B, H, keys, T]
        k_block, v_block = pieces
        probs_t = jnp.exp(_logits(k_block, q, causal, k_start, 0, rows_are_queries=False) - lse_t)
        d_value = jnp.matmul(probs_t.astype(d_out.dtype), d_out, preferred_element_type=F32)
        d_probs_t = jnp.matmul(v_block, jnp.swapaxes(d_out, -1, -2), preferred_element_type=F32)
        d_logits_t = probs_t * (d_probs_t - delta_t) * scale
        d_key = jnp.matmul(d_logits_t.astype(q.dtype), q, preferred_element_type=F32)
        return d_key.astype(k.dtype), d_value.astype(v.dtype)

    batch, heads, q_len, kv_len = *q.shape[:3], k.shape[2]
    (d_q,) = _map_blocks(d_query, (q, d_out, lse, delta), q_len,
                         block_length(batch, heads, kv_len, block))
    d_k, d_v = _map_blocks(d_key_value, (k, v), kv_len, block_length(batch, heads, q_len, block))
    return d_q, d_k, d_v


_attention_group.defvjp(_attention_group_fwd, _attention_group_bwd)
