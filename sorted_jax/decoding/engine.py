"""KV-cached decoding at any exit, early exit and self-speculative decoding.

One engine serves all modes. The decoder stack is cut into *segments* of consecutive layers
`[a, b)`, each its own `nn.scan` of `b - a` layers with its own sliced params and its own
`KVCache` (same slots, own `index`), so running a segment costs exactly its layers:

* ``fixed`` (depth k): one segment `[0, k)`; every token costs k layers + the head.
* ``early-exit`` (exits e1 < e2 < ... < em): segments `[0, e1), [e1, e2), ...`; a token runs
  segment after segment and stops at the first exit whose top-1 probability reaches its
  threshold (the last exit always accepts). Deeper segments run under `lax.cond`, so skipped
  layers cost nothing for that token.
* ``speculative`` (draft depth k): segments `[0, k)` (the draft, which is also the bottom of
  the full model) and `[k, L)`. Verification *reuses* the draft's work: the draft wrote layers
  [0, k)'s K/V for the last committed token and the drafts d_1..d_{n-1} and kept their
  layer-k hidden states; the verify pass runs layers [0, k) for d_n alone, then layers [k, L)
  once over all n + 1 tokens (a fixed-width chunk of `max_draft + 1`, padding masked).
  Rejected tokens are rolled back by moving both caches' `index` back.

Early exit decides with the top-1 probability of the plain softmax (T = 1) of each exit's
logits, then picks the token from the chosen exit's logits with the sampling settings. The
first generated token (from the prefill, where every layer runs anyway) follows the same rule.
In a batch, a deeper segment runs when any unfinished row still needs it; rows that already
exited keep their token.

**Batches** are left-padded to a common prompt length P (padding slots hold position -1 in the
cache, so they are never attended); row b's tokens keep their own positions 0, 1, .... All rows
write the same cache slot each step (lockstep), as `KVCache` requires.

**Early-exit K/V policy: lazy, exact.** A token that exits at e_s has no K/V yet in the layers
above e_s. Its hidden state after each computed segment is kept in a per-segment buffer
(`hbuf`, [B, S, D] per exit boundary), and each segment keeps a frontier (its cache `index`):
the first slot it has not processed. When a later token needs segment s, segment s first runs
over all its pending slots `[frontier, current]` in one pass (chunks of `ee_chunk` slots), which
writes the skipped tokens' K/V and computes the current token in the same causal pass. Every
K/V therefore equals what the full model computes for the same tokens, so an exit's logits
equal that exit's logits in a full forward pass without cache: early exit only changes which
exit emits each token, never any hidden state. Deferred work is batched with the next deep
token (one pass over several tokens costs about one token's weight reads on an accelerator).

**Speculative batching policy: lockstep at the slowest row.** All rows draft the same number n
of tokens; each row's verifier accepts a_b of them; every row then commits m + 1 tokens with
m = min over unfinished rows of a_b: its first m drafts and, at position m + 1, the token its
own verification produced there (its next accepted draft if a_b > m, else its correction or
bonus token). This keeps one shared cache index (no holes), greedy output stays identical to
the full model's, and sampled output stays exactly distributed as the full model's (the stop
point m is fixed by the row's own already-accepted prefix and by other rows only). Batch 1
gives the best acceptance per row; the adaptive draft length (start 4, +2 when all unfinished
rows accepted every draft, else -1, in [1, max_draft], never past max_new_tokens) is shared
by the batch.

**Memory.** Sliced per-segment params are copies of the layer weights (made once per layout
and kept by the `Decoder`); early exit keeps `[B, S, D]` hidden states per exit boundary; the
cache has `max_len` + a small slack of slots (chunked writes never clamp).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax.config import LlamaConfig
from sorted_jax.decoding.sampling import (
    SamplingParams,
    greedy_accept,
    probs_of,
    select,
    speculative_accept,
    top1_prob,
)
from sorted_jax.errors import DecodeError
from sorted_jax.modeling import KVCache, make_model, slice_layers
from sorted_jax.soft import default_exits  # the exit set SoFT trains by default

__all__ = ["MODES", "PAPER_THRESHOLDS", "Decoder", "GenerationResult", "default_exits",
           "default_thresholds", "generate"]

Array = jax.Array

MODES = ("fixed", "early-exit", "speculative")
# Paper (Sorted LLaMA, Sec. 4.4): thresholds of the first seven exits; the last always accepts.
PAPER_THRESHOLDS = (0.95, 0.95, 0.9, 0.9, 0.8, 0.8, 0.7)


def default_thresholds(num_exits: int) -> tuple[float, ...]:
    """Thresholds of the first num_exits - 1 exits (paper's list, its last value repeated)."""
    t = list(PAPER_THRESHOLDS[: max(num_exits - 1, 0)])
    t += [PAPER_THRESHOLDS[-1]] * (num_exits - 1 - len(t))
    return tuple(t)


# ---------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class GenerationResult:
    """Generated ids per row (EOS included when a row stopped on it) and run statistics.

    stats always has `mode`, `tokens` (generated, all rows), `seconds` (wall time incl. any
    compilation). early-exit adds `avg_exit_layer` and `exit_histogram` {layer: tokens};
    speculative adds `acceptance_rate` (accepted drafts / drafted, per row, before the lockstep
    cut), `committed_drafts`, `drafted`, `full_passes` (verify passes + the prefill),
    `draft_passes`, `tokens_per_full_pass`.
    """

    tokens: list[list[int]]
    stats: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Traced state


@flax.struct.dataclass
class Control:
    """Per-call traced knobs (changing them does not recompile)."""

    sampling: SamplingParams
    eos: Array  # [E] int32 (-1 entries never match)
    max_new: Array  # [] int32
    thresholds: Array  # [num_segments] float32 (early exit; the last entry is ignored)


@flax.struct.dataclass
class DecodeState:
    caches: tuple  # one KVCache per segment
    hbuf: tuple  # early exit: hidden state after each exit boundary, [B, S, D] per boundary
    last: Array  # [B] the last generated token (input of the next step)
    pos: Array  # [B] its position
    n: Array  # [] tokens generated so far (lockstep, same for all rows)
    out: Array  # [B, O] generated ids
    length: Array  # [B] generated length per row (stops growing when the row is done)
    done: Array  # [B]
    key: Array
    draft_len: Array  # [] speculative adaptive window
    stats: dict


# ---------------------------------------------------------------------------------------------
# Programs: jitted prefill / step / loop for one model shape and one segment layout


def _config_key(config: LlamaConfig) -> str:
    return json.dumps(config.to_hf_dict(), sort_keys=True)


class _Stack:
    """Segments [a, b) of one model; each a `Llama` of b - a layers (same code as training)."""

    def __init__(self, config: LlamaConfig, bounds: tuple[tuple[int, int], ...], dtype: Any,
                 attention_impl: str):
        self.config = config
        self.bounds = bounds
        self.models = [make_model(config.replace(num_hidden_layers=b - a), dtype=dtype,
                                  attention_impl=attention_impl) for a, b in bounds]

    def embed(self, params: tuple, ids: Array) -> Array:
        return self.models[0].apply({"params": params[0]}, ids, method="embed")

    def head(self, params: tuple, h: Array) -> Array:
        """fp32 logits of h `[B, D]` or `[B, T, D]` through the final norm + lm_head."""
        x = h[:, None] if h.ndim == 2 else h
        logits = self.models[0].apply({"params": params[0]}, x, method="head")
        return (logits[:, 0] if h.ndim == 2 else logits).astype(jnp.float32)

    def run(self, s: int, params: tuple, h: Array, positions: Array, valid: Array | None,
            cache: KVCache) -> tuple[Array, KVCache]:
        out = self.models[s].apply({"params": params[s]}, h, positions=positions,
                                   attention_mask=valid, cache=cache, method="run_layers")
        return out.hidden[-1], out.cache

    def init_caches(self, batch: int, slots: int, dtype: Any) -> tuple:
        return tuple(KVCache.init(self.config.replace(num_hidden_layers=b - a), batch, slots,
                                  dtype) for a, b in self.bounds)


def _commit(st: DecodeState, y: Array, count: Array, ctl: Control) -> dict:
    """Append `count` tokens of `y [B, W]` to every unfinished row; EOS / max_new stop rows."""
    active = ~st.done
    out = jax.lax.dynamic_update_slice_in_dim(st.out, y, st.n, axis=1)
    real = jnp.arange(y.shape[1]) < count
    is_eos = jnp.any(y[..., None] == ctl.eos, axis=-1) & real
    has_eos = jnp.any(is_eos, axis=1)
    first = jnp.argmax(is_eos, axis=1).astype(jnp.int32)
    new_len = jnp.minimum(st.n + jnp.where(has_eos, first + 1, count), ctl.max_new)
    n = st.n + count
    return dict(out=out, length=jnp.where(active, new_len, st.length), n=n,
                done=st.done | has_eos | (n >= ctl.max_new))


class _Programs:
    """Compiled functions for one (config, segment layout, kind, greedy, dtypes) combination."""

    def __init__(self, config: LlamaConfig, bounds: tuple[tuple[int, int], ...], kind: str,
                 greedy: bool, dtype: Any, cache_dtype: Any, attention_impl: str,
                 ee_chunk: int, max_draft: int, compiler_options: tuple = ()):
        self.stack = _Stack(config, bounds, dtype, attention_impl)
        self.kind, self.greedy = kind, greedy
        self.cache_dtype = cache_dtype
        self.ee_chunk, self.max_draft = ee_chunk, max_draft
        self.exit_layers = jnp.asarray([b for _, b in bounds], jnp.int32)
        step = self._ladder_step if kind == "ladder" else self._spec_round
        opts = dict(compiler_options) if compiler_options else None

        def loop(params, st, ctl):
            return jax.lax.while_loop(lambda s: (s.n < ctl.max_new) & ~jnp.all(s.done),
                                      lambda s: step(params, s, ctl), st)

        # `generate` runs `prefill` then `loop` (the whole decode in one while-loop);
        # streaming runs `prefill` then `step` (one token / one speculative round) per call.
        self.prefill = jax.jit(self._prefill, static_argnames=("slots",),
                               compiler_options=opts)
        self.loop = jax.jit(loop, donate_argnums=(1,), compiler_options=opts)
        self.step = jax.jit(step, donate_argnums=(1,), compiler_options=opts)

    # -- prefill -----------------------------------------------------------------------------
    def _prefill(self, params, ids, valid, positions, key, ctl, *, slots: int) -> DecodeState:
        stk = self.stack
        b, p = ids.shape
        caches = list(stk.init_caches(b, slots, self.cache_dtype))
        h = stk.embed(params, ids)
        last_h = []
        for s in range(len(stk.bounds)):
            h, caches[s] = stk.run(s, params, h, positions, valid, caches[s])
            last_h.append(h[:, -1])
        key, k_sel = jax.random.split(key)
        stats: dict[str, Array] = {}
        if self.kind == "ladder":
            logits, exit_idx = self._choose_exit([stk.head(params, x) for x in last_h], ctl,
                                                 jnp.zeros((b,), bool))
            stats = self._exit_stats(None, exit_idx, jnp.ones((b,), bool))
        else:
            logits = stk.head(params, last_h[-1])
            stats = {k: jnp.zeros((), jnp.int32) for k in (
                "rounds", "drafted", "accepted", "committed_drafts", "draft_passes")}
        tok = select(k_sel, logits, ctl.sampling, self.greedy)
        d = stk.config.hidden_size
        nbuf = len(stk.bounds) - 1 if self.kind == "ladder" else 0
        st = DecodeState(
            caches=tuple(caches),
            hbuf=tuple(jnp.zeros((b, slots, d), h.dtype) for _ in range(nbuf)),
            last=tok, pos=positions[:, -1] + 1, n=jnp.zeros((), jnp.int32),
            out=jnp.zeros((b, slots), jnp.int32), length=jnp.zeros((b,), jnp.int32),
            done=jnp.zeros((b,), bool), key=key,
            draft_len=jnp.asarray(min(4, self.max_draft), jnp.int32), stats=stats)
        return st.replace(**_commit(st, tok[:, None], jnp.ones((), jnp.int32), ctl))

    def _choose_exit(self, logits_per_exit, ctl, decided):
        """First exit whose top-1 prob passes its threshold (the last always accepts)."""
        m = len(logits_per_exit)
        logits, exit_idx = logits_per_exit[-1], jnp.full(decided.shape, m - 1, jnp.int32)
        for s in reversed(range(m - 1)):
            ok = top1_prob(logits_per_exit[s]) >= ctl.thresholds[s]
            logits = jnp.where(ok[:, None], logits_per_exit[s], logits)
            exit_idx = jnp.where(ok, s, exit_idx)
        return logits, exit_idx

    def _exit_stats(self, old, exit_idx, active):
        m = self.exit_layers.shape[0]
        hist = jnp.sum(jax.nn.one_hot(exit_idx, m, dtype=jnp.int32) * active[:, None], axis=0)
        layer_sum = jnp.sum(jnp.where(active, self.exit_layers[exit_idx], 0))
        new = {"exit_hist": hist, "exit_layer_sum": layer_sum}
        if old is None:
            return new
        return {k: old[k] + v for k, v in new.items()}

    # -- fixed / early exit ------------------------------------------------------------------
    def _ladder_step(self, params, st: DecodeState, ctl: Control) -> DecodeState:
        stk = self.stack
        m = len(stk.bounds)
        key, k_sel = jax.random.split(st.key)
        active = ~st.done
        caches, hbuf = list(st.caches), list(st.hbuf)
        cur = caches[0].index
        h, caches[0] = stk.run(0, params, stk.embed(params, st.last[:, None]),
                               st.pos[:, None], None, caches[0])
        logits = stk.head(params, h[:, 0])
        exit_idx = jnp.zeros(st.last.shape, jnp.int32)
        if m > 1:
            hbuf[0] = jax.lax.dynamic_update_slice_in_dim(hbuf[0], h, cur, axis=1)
            slot_pos = caches[0].positions
            decided = (top1_prob(logits) >= ctl.thresholds[0]) | ~active
            for s in range(1, m):
                has_out = s < m - 1

                def deeper(carry, s=s, has_out=has_out):
                    cache, hout, logits, decided, exit_idx = carry
                    cache, hout, h_cur = self._flush(s, params, cache, hbuf[s - 1], hout,
                                                     slot_pos, cur, has_out)
                    lg = stk.head(params, h_cur)
                    take = ~decided
                    logits = jnp.where(take[:, None], lg, logits)
                    exit_idx = jnp.where(take, s, exit_idx)
                    decided = decided | (top1_prob(lg) >= ctl.thresholds[s]) | (s == m - 1)
                    return cache, hout, logits, decided, exit_idx

                carry = (caches[s], hbuf[s] if has_out else None, logits, decided, exit_idx)
                carry = jax.lax.cond(jnp.all(decided), lambda c: c, deeper, carry)
                caches[s], hout, logits, decided, exit_idx = carry
                if has_out:
                    hbuf[s] = hout
        tok = select(k_sel, logits, ctl.sampling, self.greedy)
        st = st.replace(caches=tuple(caches), hbuf=tuple(hbuf), key=key,
                        stats=self._exit_stats(st.stats, exit_idx, active))
        upd = _commit(st, tok[:, None], jnp.ones((), jnp.int32), ctl)
        return st.replace(last=tok, pos=st.pos + 1, **upd)

    def _flush(self, s, params, cache, hin, hout, slot_pos, cur, has_out):
        """Run segment s over its pending slots [cache.index, cur]; returns the current
        token's hidden state after the segment. Pending slots are tokens that exited below
        this segment: their K/V here are computed now (lazily), exactly as the full model."""
        stk, w = self.stack, self.ee_chunk

        def single(_):
            h = jax.lax.dynamic_slice_in_dim(hin, cur, 1, axis=1)
            p = jax.lax.dynamic_slice_in_dim(slot_pos, cur, 1, axis=1)
            out, c = stk.run(s, params, h, p, None, cache)
            ho = jax.lax.dynamic_update_slice_in_dim(hout, out, cur, axis=1) if has_out else None
            return c, ho, out[:, 0]

        def chunked(_):
            def body(carry):
                c, ho, h_cur = carry
                start = c.index
                h = jax.lax.dynamic_slice_in_dim(hin, start, w, axis=1)
                p = jax.lax.dynamic_slice_in_dim(slot_pos, start, w, axis=1)
                valid = (start + jnp.arange(w) <= cur)[None, :] & (p >= 0)
                out, c = stk.run(s, params, h, jnp.maximum(p, 0), valid, c)
                if has_out:
                    ho = jax.lax.dynamic_update_slice_in_dim(ho, out, start, axis=1)
                here = jax.lax.dynamic_index_in_dim(out, jnp.clip(cur - start, 0, w - 1),
                                                    axis=1, keepdims=False)
                h_cur = jnp.where(cur < start + w, here, h_cur)
                return c.replace(index=jnp.minimum(start + w, cur + 1)), ho, h_cur

            h0 = jnp.zeros((hin.shape[0], hin.shape[2]), hin.dtype)
            return jax.lax.while_loop(lambda c: c[0].index <= cur, body, (cache, hout, h0))

        return jax.lax.cond(cache.index == cur, single, chunked, None)

    # -- self-speculative --------------------------------------------------------------------
    def _spec_round(self, params, st: DecodeState, ctl: Control) -> DecodeState:
        stk, wd, greedy = self.stack, self.max_draft, self.greedy
        key, k_draft, k_acc = jax.random.split(st.key, 3)
        active = ~st.done
        lo, hi = st.caches
        b = st.last.shape[0]
        cur = lo.index
        n = jnp.minimum(st.draft_len, ctl.max_new - st.n)  # >= 1 inside the loop
        d, v = stk.config.hidden_size, stk.config.vocab_size
        dt = self.stack.models[0].dtype

        def draft_body(c):
            j, cache, tok, hb, drafts, qs, k = c
            h, cache = stk.run(0, params, stk.embed(params, tok[:, None]),
                               (st.pos + j)[:, None], None, cache)
            hb = jax.lax.dynamic_update_slice_in_dim(hb, h, j, axis=1)
            lg = stk.head(params, h[:, 0])
            k, sk = jax.random.split(k)
            tok = select(sk, lg, ctl.sampling, greedy)
            drafts = jax.lax.dynamic_update_slice_in_dim(drafts, tok[:, None], j, axis=1)
            if not greedy:
                qs = jax.lax.dynamic_update_slice_in_dim(
                    qs, probs_of(lg, ctl.sampling)[:, None], j, axis=1)
            return j + 1, cache, tok, hb, drafts, qs, k

        init = (jnp.zeros((), jnp.int32), lo, st.last, jnp.zeros((b, wd + 1, d), dt),
                jnp.zeros((b, wd), jnp.int32),
                None if greedy else jnp.zeros((b, wd, v), jnp.float32), k_draft)
        _, lo, d_n, hb, drafts, qs, _ = jax.lax.while_loop(lambda c: c[0] < n, draft_body, init)
        # Verify: layers [0, k) for the last draft (the draft loop did all earlier ones and
        # wrote their K/V), then layers [k, L) for the last committed token + n drafts at once.
        h, lo = stk.run(0, params, stk.embed(params, d_n[:, None]), (st.pos + n)[:, None],
                        None, lo)
        hb = jax.lax.dynamic_update_slice_in_dim(hb, h, n, axis=1)
        idx = jnp.arange(wd + 1)
        valid = jnp.broadcast_to(idx <= n, (b, wd + 1))
        hv, hi = stk.run(1, params, hb, st.pos[:, None] + idx, valid, hi)
        logits = stk.head(params, hv)  # [B, W, V]
        if greedy:
            a, corr = greedy_accept(logits, drafts, n)
        else:
            a, corr = speculative_accept(k_acc, probs_of(logits, ctl.sampling), qs, drafts, n)
        mcut = jnp.min(jnp.where(active, a, n))
        count = mcut + 1
        d_pad = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
        nxt = jnp.where(a > mcut, jnp.take(d_pad, mcut, axis=1), corr)
        y = jnp.where(idx[None, :] < mcut, d_pad, nxt[:, None])
        n_act = jnp.sum(active.astype(jnp.int32))
        stats = dict(st.stats)
        stats["rounds"] += 1
        stats["drafted"] += n * n_act
        stats["accepted"] += jnp.sum(jnp.where(active, a, 0))
        stats["committed_drafts"] += mcut * n_act
        stats["draft_passes"] += n + 1
        draft_len = jnp.clip(jnp.where(mcut >= n, st.draft_len + 2, st.draft_len - 1), 1, wd)
        st = st.replace(caches=(lo.replace(index=cur + count), hi.replace(index=cur + count)),
                        key=key, stats=stats, draft_len=draft_len)
        upd = _commit(st, y, count, ctl)
        return st.replace(last=nxt, pos=st.pos + count, **upd)


_PROGRAMS: dict[tuple, _Programs] = {}


def _programs(config, bounds, kind, greedy, dtype, cache_dtype, attention_impl, ee_chunk,
              max_draft, compiler_options=()) -> _Programs:
    key = (_config_key(config), bounds, kind, greedy, jnp.dtype(dtype).name,
           jnp.dtype(cache_dtype).name, attention_impl,
           ee_chunk if kind == "ladder" and len(bounds) > 1 else 0,
           max_draft if kind == "speculative" else 0, compiler_options)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _Programs(config, bounds, kind, greedy, dtype, cache_dtype,
                                   attention_impl, ee_chunk, max_draft, compiler_options)
    return _PROGRAMS[key]


# ---------------------------------------------------------------------------------------------
# Public API


@dataclasses.dataclass(frozen=True)
class _Plan:
    kind: str
    bounds: tuple[tuple[int, int], ...]
    thresholds: tuple[float, ...]


class Decoder:
    """Decoding for one model: `generate` (batched, one jitted while-loop) and `stream`.

    params: our params tree (full model); config: its `LlamaConfig`. Sliced per-segment
    params are made once per layout and kept (slicing copies the layer weights; drop your own
    reference to `params` if memory is tight). Compiled programs are shared by all decoders
    of the same config, so tests and benchmarks compile each shape once.
    """

    def __init__(self, params: dict, config: LlamaConfig, *, dtype: Any = jnp.float32,
                 cache_dtype: Any = None, attention_impl: str = "xla", max_draft: int = 8,
                 ee_chunk: int = 8, pad_multiple: int = 8,
                 compiler_options: dict[str, Any] | None = None):
        if max_draft < 1:
            raise DecodeError(f"max_draft must be >= 1, got {max_draft}")
        if ee_chunk < 1:
            raise DecodeError(f"ee_chunk must be >= 1, got {ee_chunk}")
        self.params, self.config = params, config
        self.dtype = dtype
        self.cache_dtype = dtype if cache_dtype is None else cache_dtype
        self.attention_impl = attention_impl
        self.max_draft, self.ee_chunk, self.pad_multiple = max_draft, ee_chunk, pad_multiple
        self.compiler_options = tuple(sorted((compiler_options or {}).items()))
        self._seg_params: dict[tuple, tuple] = {}

    # -- argument checking -------------------------------------------------------------------
    def plan(self, mode: str = "fixed", exit_layer: int | None = None,
             exits: Sequence[int] | None = None, thresholds: Sequence[float] | None = None,
             draft_layer: int | None = None) -> _Plan:
        big_l = self.config.num_hidden_layers
        if mode == "fixed":
            k = big_l if exit_layer is None else exit_layer
            _check_layer("exit_layer", k, 1, big_l)
            return _Plan("ladder", ((0, k),), ())
        if mode == "early-exit":
            ex = tuple(default_exits(big_l) if exits is None else exits)
            if not ex:
                raise DecodeError("early-exit needs at least one exit layer")
            for e in ex:
                _check_layer("exit", e, 1, big_l)
            if any(b <= a for a, b in zip(ex, ex[1:], strict=False)):
                raise DecodeError(f"exits must be strictly increasing, got {list(ex)}")
            th = default_thresholds(len(ex)) if thresholds is None else tuple(thresholds)
            if len(th) == len(ex):
                th = th[:-1]  # the last exit always accepts
            if len(th) != len(ex) - 1:
                raise DecodeError(f"{len(ex)} exits need {len(ex) - 1} thresholds (the last exit "
                                 f"always accepts), got {len(th)}")
            th = tuple(float(t) for t in th)
            if any(math.isnan(t) for t in th):
                raise DecodeError("thresholds must be numbers, got NaN")
            bounds = tuple(zip((0, *ex[:-1]), ex, strict=True))
            return _Plan("ladder", bounds, th)
        if mode == "speculative":
            if big_l < 2:
                raise DecodeError("speculative decoding needs a model with at least 2 layers")
            k = default_exits(big_l)[0] if draft_layer is None else draft_layer
            if k >= big_l:
                k = big_l // 2 if draft_layer is None else k
            _check_layer("draft_layer", k, 1, big_l - 1)
            return _Plan("speculative", ((0, k), (k, big_l)), ())
        raise DecodeError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")

    def _params_for(self, bounds) -> tuple:
        if bounds not in self._seg_params:
            big_l = self.config.num_hidden_layers
            self._seg_params[bounds] = tuple(
                self.params if (a, b) == (0, big_l) else slice_layers(self.params, a, b)
                for a, b in bounds)
        return self._seg_params[bounds]

    def _prepare(self, prompts, max_new_tokens, max_len, temperature, top_k, top_p, eos_id,
                 slack):
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise DecodeError("prompts must be a list of token-id lists")
        if len(prompts) == 0:
            raise DecodeError("no prompts given")
        prompts = [[int(t) for t in p] for p in prompts]
        cfg = self.config
        for i, p in enumerate(prompts):
            if not p:
                raise DecodeError(f"prompt {i} is empty: at least one token (e.g. BOS) is needed")
            bad = [t for t in p if not 0 <= t < cfg.vocab_size]
            if bad:
                raise DecodeError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}): "
                                 f"{bad[:5]}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise DecodeError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise DecodeError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise DecodeError(f"top_k must be >= 0 (0 = off), got {top_k}")
        longest = max(len(p) for p in prompts)
        ctx = cfg.max_position_embeddings
        if longest + max_new_tokens > ctx:
            raise DecodeError(
                f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                f"model's context of {ctx} positions")
        mult = self.pad_multiple
        p_len = -(-longest // mult) * mult
        need = p_len + max_new_tokens
        if max_len is None:
            max_len = -(-need // 64) * 64
        if need > max_len:
            raise DecodeError(
                f"the KV cache holds {max_len} slots but prompt ({longest} tokens, padded to "
                f"{p_len}) + max_new_tokens={max_new_tokens} needs {need}; raise max_len or "
                "shorten the prompt / generation")
        b = len(prompts)
        ids = np.zeros((b, p_len), np.int32)
        valid = np.zeros((b, p_len), bool)
        pos = np.zeros((b, p_len), np.int32)
        for i, p in enumerate(prompts):
            ids[i, p_len - len(p):] = p
            valid[i, p_len - len(p):] = True
            pos[i, p_len - len(p):] = np.arange(len(p))
        if eos_id is None:
            eos_id = cfg.eos_token_id
        eos = [] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id))
        eos_arr = np.asarray(eos + [-1], np.int32)
        sp = SamplingParams.make(temperature if temperature > 0 else 1.0, top_k, top_p)
        return ids, valid, pos, eos_arr, sp, max_len + slack

    def _start(self, prompts, mode, exit_layer, exits, thresholds, draft_layer, max_new_tokens,
               temperature, top_k, top_p, seed, eos_id, max_len):
        plan = self.plan(mode, exit_layer, exits, thresholds, draft_layer)
        slack = max(self.ee_chunk, self.max_draft + 1)
        ids, valid, pos, eos, sp, slots = self._prepare(
            prompts, max_new_tokens, max_len, temperature, top_k, top_p, eos_id, slack)
        greedy = temperature == 0
        progs = _programs(self.config, plan.bounds, plan.kind, greedy, self.dtype,
                          self.cache_dtype, self.attention_impl, self.ee_chunk, self.max_draft,
                          self.compiler_options)
        th = np.asarray(list(plan.thresholds) + [0.0], np.float32)
        ctl = Control(sp, jnp.asarray(eos), jnp.asarray(max_new_tokens, jnp.int32),
                      jnp.asarray(th))
        params = self._params_for(plan.bounds)
        inputs = (jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(pos),
                  jax.random.PRNGKey(seed), ctl)
        return plan, progs, params, ctl, inputs, slots

    def generate(self, prompts: Sequence[Sequence[int]], *, mode: str = "fixed",
                 exit_layer: int | None = None, exits: Sequence[int] | None = None,
                 thresholds: Sequence[float] | None = None, draft_layer: int | None = None,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, eos_id: int | Sequence[int] | None = None,
                 max_len: int | None = None) -> GenerationResult:
        """Generate for a batch of token-id prompts (BOS included if the model wants one).

        mode: ``fixed`` (depth `exit_layer`, default the full model), ``early-exit`` (`exits`,
        default `default_exits(L)`; `thresholds` for all but the last exit, default the
        paper's), ``speculative`` (draft depth `draft_layer`). temperature 0 = greedy.
        eos_id: id(s) that stop a row (default the config's eos_token_id; [] = never).
        max_len: KV cache slots (default: padded prompt + max_new_tokens, rounded up to 64).
        """
        t0 = time.perf_counter()
        plan, progs, params, ctl, inputs, slots = self._start(
            prompts, mode, exit_layer, exits, thresholds, draft_layer, max_new_tokens,
            temperature, top_k, top_p, seed, eos_id, max_len)
        st = progs.loop(params, progs.prefill(params, *inputs, slots=slots), ctl)
        out, length, stats = jax.device_get((st.out, st.length, st.stats))
        tokens = [out[i, :length[i]].tolist() for i in range(out.shape[0])]
        return GenerationResult(tokens, self._stats(mode, plan, stats, tokens,
                                                    time.perf_counter() - t0))

    def stream(self, prompt: Sequence[int], **kwargs: Any) -> Iterator[list[int]]:
        """Generate for one prompt, yielding each step's new token ids as they are made.

        Takes `generate`'s keyword arguments. After the iterator ends, `self.last_stats` holds
        the run's statistics.
        """
        t0 = time.perf_counter()
        unknown = sorted(set(kwargs) - set(_GEN_DEFAULTS))
        if unknown:
            raise TypeError(f"stream() got unexpected keyword arguments {unknown}")
        mode = kwargs.get("mode", "fixed")
        args = {k: kwargs.get(k, v) for k, v in _GEN_DEFAULTS.items()}
        plan, progs, params, ctl, inputs, slots = self._start([prompt], **args)
        st = progs.prefill(params, *inputs, slots=slots)
        sent = 0
        while True:
            length, done = jax.device_get((st.length[0], st.done[0]))
            if length > sent:
                yield jax.device_get(st.out[0, sent:length]).tolist()
                sent = int(length)
            if done:
                break
            st = progs.step(params, st, ctl)
        out, stats = jax.device_get((st.out[0, :sent], st.stats))
        self.last_stats = self._stats(mode, plan, stats, [out.tolist()],
                                      time.perf_counter() - t0)

    @staticmethod
    def _stats(mode, plan, raw, tokens, seconds) -> dict[str, Any]:
        total = sum(len(t) for t in tokens)
        stats: dict[str, Any] = {"mode": mode, "tokens": total, "seconds": seconds}
        if plan.kind == "ladder":
            hist = [int(x) for x in raw["exit_hist"]]
            stats["layers"] = plan.bounds[0][1] if len(plan.bounds) == 1 else None
            if len(plan.bounds) > 1:
                n = max(sum(hist), 1)
                stats["avg_exit_layer"] = float(raw["exit_layer_sum"]) / n
                layers = [b for _, b in plan.bounds]
                stats["exit_histogram"] = dict(zip(layers, hist, strict=True))
                stats["thresholds"] = list(plan.thresholds)
        else:
            drafted = int(raw["drafted"])
            rounds = int(raw["rounds"])
            stats.update(
                draft_layer=plan.bounds[0][1], drafted=drafted, accepted=int(raw["accepted"]),
                acceptance_rate=int(raw["accepted"]) / drafted if drafted else 0.0,
                committed_drafts=int(raw["committed_drafts"]), full_passes=rounds + 1,
                draft_passes=int(raw["draft_passes"]),
                tokens_per_full_pass=(total / len(tokens)) / (rounds + 1))
        return stats


_GEN_DEFAULTS: dict[str, Any] = dict(
    mode="fixed", exit_layer=None, exits=None, thresholds=None, draft_layer=None,
    max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, seed=0, eos_id=None, max_len=None)


def _check_layer(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not (
            lo <= value <= hi):
        raise DecodeError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")


def generate(params: dict, config: LlamaConfig, prompts: Sequence[Sequence[int]],
             **kwargs: Any) -> GenerationResult:
    """One-shot `Decoder(params, config).generate(prompts, **kwargs)`."""
    dec_keys = ("dtype", "cache_dtype", "attention_impl", "max_draft", "ee_chunk",
                "pad_multiple")
    dec_kw = {k: kwargs.pop(k) for k in dec_keys if k in kwargs}
    return Decoder(params, config, **dec_kw).generate(prompts, **kwargs)
