"""Token selection: greedy, temperature / top-k / top-p sampling, speculative acceptance.

Every function here is pure JAX on logits or probabilities, with batch on the leading axes.
Sampling knobs are traced scalars, so changing them does not recompile; only the choice
greedy-vs-sampling is static (greedy skips the sort).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -jnp.inf


@flax.struct.dataclass
class SamplingParams:
    """Traced sampling knobs. `top_k <= 0` and `top_p >= 1` disable those filters."""

    temperature: Array  # [] float32, > 0 when sampling
    top_k: Array  # [] int32
    top_p: Array  # [] float32 in (0, 1]

    @classmethod
    def make(cls, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
             ) -> SamplingParams:
        return cls(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
                   jnp.asarray(top_p, jnp.float32))


def warp_logits(logits: Array, sp: SamplingParams) -> Array:
    """fp32 logits after temperature, then top-k, then top-p (HF's order); cut tokens = -inf.

    top-p keeps the smallest set of most likely tokens whose probability reaches `top_p`
    (a token is kept when the mass strictly before it is < top_p, so the top token always is).
    Tokens tied with a cut-off value are kept.
    """
    x = logits.astype(jnp.float32) / jnp.maximum(sp.temperature, 1e-6)
    vocab = x.shape[-1]
    desc = -jnp.sort(-x, axis=-1)
    k = jnp.where((sp.top_k <= 0) | (sp.top_k >= vocab), vocab, sp.top_k)
    kth = jax.lax.dynamic_index_in_dim(desc, k - 1, axis=-1, keepdims=True)
    x = jnp.where(x < kth, NEG_INF, x)
    desc = jnp.where(jnp.arange(vocab) < k, desc, NEG_INF)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(before < sp.top_p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
    return jnp.where(x < cutoff, NEG_INF, x)


def probs_of(logits: Array, sp: SamplingParams) -> Array:
    """The sampling distribution (fp32) that `select` draws from."""
    return jax.nn.softmax(warp_logits(logits, sp), axis=-1)


def select(key: Array, logits: Array, sp: SamplingParams, greedy: bool) -> Array:
    """One token per row of `logits [..., V]`: argmax when `greedy`, else a warped sample."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, warp_logits(logits, sp), axis=-1).astype(jnp.int32)


def top1_prob(logits: Array) -> Array:
    """Confidence used by early exit: the top-1 probability of the plain softmax (T = 1)."""
    return jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def _leading_true(ok: Array) -> Array:
    """Number of leading True values along the last axis."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def _per_row(n: Array, drafts: Array) -> Array:
    """`n` (`[]` or `[B]`) as a `[B, 1]` column that broadcasts against `drafts [B, W-1]`."""
    return jnp.broadcast_to(jnp.asarray(n, jnp.int32), drafts.shape[:1])[:, None]


def greedy_accept(target_logits: Array, drafts: Array, n: Array) -> tuple[Array, Array]:
    """Greedy verification.

    target_logits `[B, W, V]`: the target's logits after the last committed token (position 0)
    and after each draft; drafts `[B, W-1]`; n: how many drafts are real (<= W-1).
    Returns (accepted count a `[B]`, the target's token after the accepted prefix `[B]`).
    """
    best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, W]
    ok = (best[:, :-1] == drafts) & (jnp.arange(drafts.shape[1]) < _per_row(n, drafts))
    a = _leading_true(ok)
    return a, jnp.take_along_axis(best, a[:, None], axis=1)[:, 0]


def speculative_accept(key: Array, p: Array, q: Array, drafts: Array, n: Array
                       ) -> tuple[Array, Array]:
    """Speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

    p `[B, W, V]`: target probabilities at positions 0..W-1; q `[B, W-1, V]`: the draft
    probabilities each draft was sampled from; drafts `[B, W-1]`; n: number of real drafts
    (`[]` or `[B]`).
    Draft j is accepted with probability min(1, p_j(d)/q_j(d)); at the first rejection the
    token is drawn from norm(max(p_j - q_j, 0)); when all n are accepted a bonus token is
    drawn from p_n. Every emitted token is then distributed as the target's p.
    Returns (accepted count a `[B]`, the emitted token after the accepted prefix `[B]`).
    """
    k_u, k_tok = jax.random.split(key)
    b, w1 = drafts.shape
    p_d = jnp.take_along_axis(p[:, :-1], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_u, (b, w1))
    n = _per_row(n, drafts)
    ok = (u * q_d < p_d) & (jnp.arange(w1) < n)
    a = _leading_true(ok)
    p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]
    q_a = jnp.take_along_axis(q, jnp.minimum(a, w1 - 1)[:, None, None], axis=1)[:, 0]
    q_a = jnp.where(a[:, None] < n, q_a, 0.0)
    resid = jnp.maximum(p_a - q_a, 0.0)
    mass = jnp.sum(resid, axis=-1, keepdims=True)
    resid = jnp.where(mass > 0, resid, p_a)  # p == q exactly: a rejection cannot happen
    tok = jax.random.categorical(k_tok, jnp.log(resid), axis=-1).astype(jnp.int32)
    return a, tok
