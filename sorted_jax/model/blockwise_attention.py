"""Causal self-attention by blocks, in plain JAX: what a backend without a fused kernel runs.

XLA's reference `jax.nn.dot_product_attention` materialises the `[B, H, T, T]` fp32 scores,
their mask and their softmax, and autodiff keeps the softmax of every layer for the backward
pass (under `nn.scan`, one `[L, B, H, T, T]` buffer that is zeroed and filled each step). On
CPU that is the largest single cost of a training step (memory-bound passes over arrays far
larger than the caches). Here, as FlashAttention does:

- the queries go by blocks of `block` tokens, and each block only meets the keys at or before
  its last token (the causal upper triangle is never computed: about half the work);
- a block's keys go by chunks of `key_chunk`, with an online softmax across chunks, so no
  array is larger than `[B, K, block x G, key_chunk]`;
- the backward pass (a `custom_vjp`) keeps only the output and the row logsumexp, and
  recomputes each block's probabilities from them.

Grouped-query heads share their key/value head's block: the G query heads of a KV head are
folded into the query rows (`[B, K, T x G, Dh]`), so every dot is a plain batched matmul.
Masks are built per block from `[B]` / `[B, T]` vectors, never as a `[B, T, T]` array: key
padding (`kv_lengths`, or `kv_valid`) and packed segments (`segment_ids`).

Equal to the reference wherever a query sees at least one key (value and gradient); a query
that sees none (a padding token of a packed row) gets the mean of the values before it, where
the reference takes the mean over all keys: neither reaches a loss. Used when no KV cache is
involved (training, evaluation): keys then never lie after their query in the row, so index
order is causal order (positions rise within a segment).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Measured on a 2-core CPU (B 4, T 512, 8 heads of 32, GQA 2): 64 / 256 and neighbours run a
# layer's forward + backward ~3x faster than the reference; 256-token blocks lose a third of
# that (their scores no longer fit the caches).
DEFAULT_BLOCK = 64
DEFAULT_KEY_CHUNK = 256
MAX_BLOCKS = 16  # longer sequences get longer blocks: at most ~MAX_BLOCKS^2 / 2 block pairs


class _Plan(NamedTuple):
    """Static shapes: query blocks and key chunks (token ranges), heads and the scale."""

    t: int
    block: int
    key_chunk: int
    groups: int
    scale: float

    def q_blocks(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.block, self.t)) for s in range(0, self.t, self.block)]

    def k_chunks(self, q_stop: int) -> list[tuple[int, int]]:
        """Key chunks a query block ending (exclusive) at `q_stop` meets: keys < q_stop."""
        return [(s, min(s + self.key_chunk, q_stop)) for s in range(0, q_stop, self.key_chunk)]


class _Masks(NamedTuple):
    """Per-token mask vectors (None = that condition is off)."""

    kv_lengths: Array | None  # [B] int: keys at or past it are padding
    kv_valid: Array | None  # [B, T] bool
    segment_ids: Array | None  # [B, T] int: tokens attend within their segment


def plan_blocks(t: int, block: int | None = None, key_chunk: int | None = None) -> tuple[int, int]:
    """(block, key_chunk) for a sequence of `t` tokens."""
    block = block or max(DEFAULT_BLOCK, -(-t // MAX_BLOCKS))
    key_chunk = key_chunk or max(DEFAULT_KEY_CHUNK, block)
    return min(block, t), min(key_chunk, t)


def causal_attention(q: Array, k: Array, v: Array, *, kv_lengths: Array | None = None,
                     kv_valid: Array | None = None, segment_ids: Array | None = None,
                     block: int | None = None, key_chunk: int | None = None) -> Array:
    """Causal attention `[B, T, N, Dh]` of q `[B, T, N, Dh]` over k, v `[B, T, K, Dh]`.

    The same result as `jax.nn.dot_product_attention(q, k, v, is_causal=True, ...)` with the
    key padding given by `kv_lengths` `[B]` or `kv_valid` `[B, T]` and, for packed rows,
    `segment_ids` `[B, T]` (a query attends the keys of its own segment). N must be a multiple
    of K (grouped-query attention). Scores and softmax in fp32; the output in q's dtype.
    """
    b, t, n, dh = q.shape
    kh = k.shape[2]
    if k.shape != (b, t, kh, dh) or v.shape != k.shape or n % kh:
        raise ValueError(f"causal_attention needs q [B, T, N, Dh] and k, v [B, T, K, Dh] with "
                         f"K dividing N, got {q.shape}, {k.shape}, {v.shape}")
    blk, chunk = plan_blocks(t, block, key_chunk)
    plan = _Plan(t, blk, chunk, n // kh, 1.0 / math.sqrt(dh))
    masks = _Masks(None if kv_lengths is None else kv_lengths.astype(jnp.int32),
                   None if kv_valid is None else kv_valid.astype(bool),
                   None if segment_ids is None else segment_ids.astype(jnp.int32))
    qr = _fold(q, kh)
    kr, vr = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, T, Dh]
    out = _attention(qr, kr, vr, masks, plan)
    return _unfold(out, plan.groups).astype(q.dtype)


def _fold(q: Array, kh: int) -> Array:
    """`[B, T, K x G, Dh]` -> `[B, K, T x G, Dh]` (row t x G + g is token t, group head g)."""
    b, t, n, dh = q.shape
    return q.reshape(b, t, kh, n // kh, dh).transpose(0, 2, 1, 3, 4).reshape(b, kh, -1, dh)


def _unfold(x: Array, groups: int) -> Array:
    b, kh, rows, dh = x.shape
    t = rows // groups
    return x.reshape(b, kh, t, groups, dh).transpose(0, 2, 1, 3, 4).reshape(b, t, -1, dh)


_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # what jax's reference masks with


def _mask(masks: _Masks, plan: _Plan, q_range: tuple[int, int],
          k_range: tuple[int, int]) -> Array | None:
    """`[B or 1, 1, rows, keys]` bool for one (query block, key chunk) pair; None: all true."""
    (q0, q1), (k0, k1) = q_range, k_range
    rows = (q1 - q0) * plan.groups
    q_tok = q0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // plan.groups
    k_tok = k0 + jax.lax.broadcasted_iota(jnp.int32, (1, k1 - k0), 1)
    out = None
    if k1 - 1 > q0:  # the chunk reaches past the block's first query: the causal edge
        out = (k_tok <= q_tok)[None, None]
    if masks.kv_lengths is not None:
        ok = k_tok[None] < masks.kv_lengths[:, None, None]  # [B, 1, keys]
        out = ok[:, None] if out is None else out & ok[:, None]
    if masks.kv_valid is not None:
        ok = masks.kv_valid[:, None, None, k0:k1]
        out = ok if out is None else out & ok
    if masks.segment_ids is not None:
        q_seg = jnp.repeat(masks.segment_ids[:, q0:q1], plan.groups, axis=1)
        ok = (q_seg[:, :, None] == masks.segment_ids[:, None, k0:k1])[:, None]
        out = ok if out is None else out & ok
    return out


def _scores(qb: Array, kc: Array, mask: Array | None, scale: float) -> Array:
    s = jnp.einsum("bkrd,bksd->bkrs", qb, kc, preferred_element_type=jnp.float32) * scale
    return s if mask is None else jnp.where(mask, s, _NEG)


def _forward(q: Array, k: Array, v: Array, masks: _Masks, plan: _Plan) -> tuple[Array, Array]:
    """(out `[B, K, T x G, Dh]` fp32, row logsumexp `[B, K, T x G, 1]`)."""
    outs, lses = [], []
    g = plan.groups
    for q0, q1 in plan.q_blocks():
        qb = q[:, :, q0 * g:q1 * g]
        m = l_sum = acc = None
        for k0, k1 in plan.k_chunks(q1):
            s = _scores(qb, k[:, :, k0:k1], _mask(masks, plan, (q0, q1), (k0, k1)), plan.scale)
            top = jnp.max(s, axis=-1, keepdims=True)
            if m is None:
                m_new, p = top, jnp.exp(s - top)
            else:
                m_new = jnp.maximum(m, top)
                p = jnp.exp(s - m_new)
            pv = jnp.einsum("bkrs,bksd->bkrd", p.astype(v.dtype), v[:, :, k0:k1],
                            preferred_element_type=jnp.float32)
            if m is None:
                l_sum, acc = jnp.sum(p, axis=-1, keepdims=True), pv
            else:
                alpha = jnp.exp(m - m_new)
                l_sum = alpha * l_sum + jnp.sum(p, axis=-1, keepdims=True)
                acc = alpha * acc + pv
            m = m_new
        outs.append(acc / l_sum)
        lses.append(m + jnp.log(l_sum))
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q: Array, k: Array, v: Array, masks: _Masks, plan: _Plan) -> Array:
    return _forward(q, k, v, masks, plan)[0]


def _attention_fwd(q, k, v, masks, plan):
    out, lse = _forward(q, k, v, masks, plan)
    return out, (q, k, v, masks, out, lse)


def _attention_bwd(plan, res, d_out):
    """FlashAttention's backward: per block pair, p from the saved logsumexp, then
    dv += p^T do, ds = p (do v^T - rowsum(do o)), dq += ds k, dk += ds^T q (scaled)."""
    q, k, v, masks, out, lse = res
    g = plan.groups
    delta = jnp.sum(d_out * out, axis=-1, keepdims=True)  # [B, K, rows, 1]
    dq_blocks = []
    dk: dict[tuple[int, int], Array] = {}
    dv: dict[tuple[int, int], Array] = {}
    for q0, q1 in plan.q_blocks():
        rows = slice(q0 * g, q1 * g)
        qb, dob = q[:, :, rows], d_out[:, :, rows].astype(v.dtype)
        dq = None
        for k0, k1 in plan.k_chunks(q1):
            kc, vc = k[:, :, k0:k1], v[:, :, k0:k1]
            s = _scores(qb, kc, _mask(masks, plan, (q0, q1), (k0, k1)), plan.scale)
            p = jnp.exp(s - lse[:, :, rows])
            dv_part = jnp.einsum("bkrs,bkrd->bksd", p.astype(v.dtype), dob,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkrd,bksd->bkrs", dob, vc, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[:, :, rows]) * plan.scale).astype(q.dtype)
            dq_part = jnp.einsum("bkrs,bksd->bkrd", ds, kc, preferred_element_type=jnp.float32)
            dk_part = jnp.einsum("bkrs,bkrd->bksd", ds, qb, preferred_element_type=jnp.float32)
            dq = dq_part if dq is None else dq + dq_part
            key = (k0, k1)
            dk[key] = dk_part if key not in dk else dk[key] + dk_part
            dv[key] = dv_part if key not in dv else dv[key] + dv_part
        dq_blocks.append(dq)
    # chunks of different query blocks may end at different tokens: lay each on [0, T)
    t = plan.t

    def assemble(parts: dict[tuple[int, int], Array], like: Array) -> Array:
        total = jnp.zeros((*like.shape[:2], t, like.shape[-1]), jnp.float32)
        for (k0, k1), part in parts.items():
            total = total.at[:, :, k0:k1].add(part)
        return total.astype(like.dtype)

    d_q = jnp.concatenate(dq_blocks, axis=2).astype(q.dtype)
    # the integer / boolean mask vectors get zero cotangents (their tangent type is float0)
    no_grad = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), masks)
    return d_q, assemble(dk, k), assemble(dv, v), no_grad


_attention.defvjp(_attention_fwd, _attention_bwd)
