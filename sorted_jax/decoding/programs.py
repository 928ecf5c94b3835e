"""The compiled side of decoding: `Programs`, a frozen, hashable value whose jitted methods
(`prefill`, `loop`, `step`) take it as a static argument (the traced state is `state`'s).

`Programs` names everything a compiled program depends on (the model shape, the segment
layout, greedy or sampling, dtypes, attention, the early-exit chunk and the draft window): two
equal values share their compiled programs, whichever `Decoder` made them, and anything that
only changes traced inputs (prompts, sampling knobs, EOS ids, thresholds, seeds) reuses them.
This is Gemma's sampler pattern (`jax.jit(..., static_argnames=("self",))`); one set of jitted
functions exists per set of XLA compiler options. See `engine` for the algorithms.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sorted_jax.decoding.options import Route
from sorted_jax.decoding.sampling import (
    greedy_accept,
    probs_of,
    select,
    speculative_accept,
    top1_prob,
)
from sorted_jax.decoding.state import Control, DecodeState, LadderCounts, SpecCounts, Stack
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.kv_cache import write_slots

Array = jax.Array


def _commit(st: DecodeState, y: Array, count: Array, ctl: Control) -> dict:
    """Append the first `count[b]` tokens of `y [B, W]` to each unfinished row b, at its own
    offset `n[b]`; EOS / max_new stop rows. Finished rows do not move."""
    active = ~st.done
    count = jnp.broadcast_to(count, active.shape)
    out = write_slots(st.out, y, st.n)  # past a row's length: never read
    real = jnp.arange(y.shape[1])[None, :] < count[:, None]
    is_eos = jnp.any(y[..., None] == ctl.eos, axis=-1) & real
    has_eos = jnp.any(is_eos, axis=1)
    first = jnp.argmax(is_eos, axis=1).astype(jnp.int32)
    new_len = jnp.minimum(st.n + jnp.where(has_eos, first + 1, count), ctl.max_new)
    n = st.n + jnp.where(active, count, 0)
    return dict(out=out, length=jnp.where(active, new_len, st.length), n=n,
                done=st.done | (active & has_eos) | (n >= ctl.max_new))


def _freeze(x: Any) -> Any:
    """A hashable copy of a JSON-like value (dicts as sorted item tuples, lists as tuples)."""
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, list | tuple):
        return tuple(_freeze(v) for v in x)
    return x


@dataclasses.dataclass(frozen=True)
class Programs:
    """The compiled programs of one (model shape, segment layout, kind, greedy, dtypes, ...).

    Build with `Programs.make`, which drops settings a kind does not use (the early-exit chunk
    of a single segment, the draft window of a ladder), so equal programs compare equal.
    """

    config: LlamaConfig = dataclasses.field(compare=False)  # hashed through `config_key`
    bounds: tuple[tuple[int, int], ...]
    kind: str  # "ladder" | "speculative"
    greedy: bool
    dtype: str  # compute dtype name
    cache_dtype: str
    attention_impl: str
    ee_chunk: int
    max_draft: int
    spec_commit: str = "per-row"  # speculative: "per-row" | "lockstep" (see `engine`)
    compiler_options: tuple[tuple[str, Any], ...] = ()
    config_key: tuple = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "config_key", _freeze(self.config.to_hf_dict()))

    @classmethod
    def make(cls, config: LlamaConfig, route: Route, *, greedy: bool, dtype: Any, cache_dtype: Any,
             attention_impl: str, ee_chunk: int, max_draft: int, spec_commit: str = "per-row",
             compiler_options: tuple = ()) -> Programs:
        ladder = route.kind == "ladder"
        return cls(config, route.bounds, route.kind, bool(greedy), jnp.dtype(dtype).name,
                   jnp.dtype(cache_dtype).name, attention_impl,
                   ee_chunk if ladder and len(route.bounds) > 1 else 0,
                   0 if ladder else max_draft, "" if ladder else spec_commit,
                   tuple(compiler_options))

    @functools.cached_property
    def stack(self) -> Stack:
        return Stack(self.config, self.bounds, jnp.dtype(self.dtype), self.attention_impl)

    @property
    def exit_layers(self) -> Array:
        return jnp.asarray([b for _, b in self.bounds], jnp.int32)

    # -- the jitted entry points (`self` is static) ------------------------------------------
    def prefill(self, params, ids, valid, positions, key, ctl, *, slots: int) -> DecodeState:
        return _jitted(self.compiler_options)["prefill"](self, params, ids, valid, positions,
                                                         key, ctl, slots=slots)

    def loop(self, params, st: DecodeState, ctl: Control) -> DecodeState:
        """The whole decode after `prefill`: one while-loop until every row is done."""
        return _jitted(self.compiler_options)["loop"](self, params, st, ctl)

    def step(self, params, st: DecodeState, ctl: Control) -> DecodeState:
        """One token (ladder) or one speculative round (streaming)."""
        return _jitted(self.compiler_options)["step"](self, params, st, ctl)

    def prefill_shape(self, params, ids, valid, positions, key, ctl, *, slots: int) -> Any:
        """The decode state `prefill` would return, as shapes (nothing runs)."""
        return _jitted(self.compiler_options)["prefill"].lower(
            self, params, ids, valid, positions, key, ctl, slots=slots).out_info

    def compiled_loop(self, params, st: DecodeState, ctl: Control) -> Any:
        """`loop` lowered and compiled for these (abstract or real) inputs: its
        `memory_analysis()` gives decoding's device memory without running it."""
        return _jitted(self.compiler_options)["loop"].lower(self, params, st, ctl).compile()

    def insert(self, st: DecodeState, row: DecodeState, b: Array) -> DecodeState:
        """`st` with its row b replaced by `row`, a one-prompt prefill (speculative only:
        every row there has its own cache length, so a new request can join a running batch
        at the next round). `st` is donated."""
        return _jitted(self.compiler_options)["insert"](self, st, row, b)

    def _insert(self, st: DecodeState, row: DecodeState, b: Array) -> DecodeState:
        if self.kind != "speculative":
            raise ValueError("only speculative batches keep per-row cache lengths")

        def put(x, y, axis=0):
            return jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), b, axis=axis)

        def put_cache(c, r):
            return None if c is None else c.replace(
                k=put(c.k, r.k, 1), v=put(c.v, r.v, 1), positions=put(c.positions, r.positions),
                index=put(c.index, r.index))

        caches = tuple(put_cache(c, r) for c, r in zip(st.caches, row.caches, strict=True))
        acaches = tuple(put_cache(c, r) for c, r in zip(st.acaches, row.acaches, strict=True))
        stats = st.stats.replace(row_committed=put(st.stats.row_committed,
                                                   row.stats.row_committed),
                                 row_rounds=put(st.stats.row_rounds, row.stats.row_rounds))
        rows = {name: put(getattr(st, name), getattr(row, name)) for name in (
            "last", "pos", "n", "out", "length", "done", "draft_len")}
        return st.replace(caches=caches, acaches=acaches, stats=stats, **rows)

    def _advance(self, params, st: DecodeState, ctl: Control) -> DecodeState:
        fn = self._ladder_step if self.kind == "ladder" else self._spec_round
        return fn(params, st, ctl)

    def _step(self, params, st: DecodeState, ctl: Control) -> DecodeState:
        return self._advance(params, st, ctl)

    def _loop(self, params, st: DecodeState, ctl: Control) -> DecodeState:
        return jax.lax.while_loop(lambda s: ~jnp.all(s.done),
                                  lambda s: self._advance(params, s, ctl), st)

    # -- prefill -----------------------------------------------------------------------------
    def _prefill(self, params, ids, valid, positions, key, ctl, *, slots: int) -> DecodeState:
        """Run every segment over the (left-padded) prompts; choose the first token."""
        stk = self.stack
        b, p = ids.shape
        per_row = self.kind == "speculative"
        caches = list(stk.init_caches(b, slots, jnp.dtype(self.cache_dtype), per_row=per_row))
        acaches = list(stk.init_adapter_caches(b, slots, jnp.dtype(self.cache_dtype),
                                               per_row=per_row))
        h = stk.embed(params, ids)
        last_h = []
        for s in range(len(stk.bounds)):
            h, caches[s] = stk.run(s, params, h, positions, valid, caches[s])
            ha, acaches[s] = stk.adapt(s, params, h, positions, valid, acaches[s])
            last_h.append(ha[:, -1])
        key, k_sel = jax.random.split(key)
        stats: LadderCounts | SpecCounts
        if self.kind == "ladder":
            logits, exit_idx = self._choose_exit([stk.head(params, x) for x in last_h], ctl,
                                                 jnp.zeros((b,), bool))
            stats = self._exit_stats(None, exit_idx, jnp.ones((b,), bool))
        else:
            logits = stk.head(params, last_h[-1])
            stats = SpecCounts.zeros(b)
        tok = select(k_sel, logits, ctl.sampling, self.greedy)
        d = stk.config.hidden_size
        nbuf = len(stk.bounds) - 1 if self.kind == "ladder" else 0
        st = DecodeState(
            caches=tuple(caches), acaches=tuple(acaches),
            hbuf=tuple(jnp.zeros((b, slots, d), h.dtype) for _ in range(nbuf)),
            last=tok, pos=positions[:, -1] + 1, n=jnp.zeros((b,), jnp.int32),
            out=jnp.zeros((b, slots), jnp.int32), length=jnp.zeros((b,), jnp.int32),
            done=jnp.zeros((b,), bool), key=key,
            draft_len=jnp.full((b,), min(4, self.max_draft), jnp.int32), stats=stats)
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
        if old is None:
            return LadderCounts(hist, layer_sum)
        return LadderCounts(old.exit_hist + hist, old.exit_layer_sum + layer_sum)

    # -- fixed / early exit ------------------------------------------------------------------
    def _ladder_step(self, params, st: DecodeState, ctl: Control) -> DecodeState:
        stk = self.stack
        m = len(stk.bounds)
        key, k_sel = jax.random.split(st.key)
        active = ~st.done
        caches, acaches, hbuf = list(st.caches), list(st.acaches), list(st.hbuf)
        cur = caches[0].index
        h, caches[0] = stk.run(0, params, stk.embed(params, st.last[:, None]),
                               st.pos[:, None], None, caches[0])
        ha, acaches[0] = stk.adapt(0, params, h, st.pos[:, None], None, acaches[0])
        logits = stk.head(params, ha[:, 0])
        exit_idx = jnp.zeros(st.last.shape, jnp.int32)
        if m > 1:
            hbuf[0] = jax.lax.dynamic_update_slice_in_dim(hbuf[0], h, cur, axis=1)
            slot_pos = caches[0].positions
            decided = (top1_prob(logits) >= ctl.thresholds[0]) | ~active
            for s in range(1, m):
                has_out = s < m - 1

                def deeper(carry, s=s, has_out=has_out):
                    cache, acache, hout, logits, decided, exit_idx = carry
                    cache, acache, hout, h_cur = self._flush(s, params, cache, acache,
                                                             hbuf[s - 1], hout, slot_pos, cur,
                                                             has_out)
                    lg = stk.head(params, h_cur)
                    take = ~decided
                    logits = jnp.where(take[:, None], lg, logits)
                    exit_idx = jnp.where(take, s, exit_idx)
                    decided = decided | (top1_prob(lg) >= ctl.thresholds[s]) | (s == m - 1)
                    return cache, acache, hout, logits, decided, exit_idx

                carry = (caches[s], acaches[s], hbuf[s] if has_out else None, logits, decided,
                         exit_idx)
                carry = jax.lax.cond(jnp.all(decided), lambda c: c, deeper, carry)
                caches[s], acaches[s], hout, logits, decided, exit_idx = carry
                if has_out:
                    hbuf[s] = hout
        tok = select(k_sel, logits, ctl.sampling, self.greedy)
        st = st.replace(caches=tuple(caches), acaches=tuple(acaches), hbuf=tuple(hbuf), key=key,
                        stats=self._exit_stats(st.stats, exit_idx, active))
        upd = _commit(st, tok[:, None], jnp.ones((), jnp.int32), ctl)
        return st.replace(last=tok, pos=st.pos + 1, **upd)

    def _flush(self, s, params, cache, acache, hin, hout, slot_pos, cur, has_out):
        """Run segment s over its pending slots [cache.index, cur]; returns the current
        token's state for segment s's logits (through its exit adapter, if any). Pending slots
        are tokens that exited below this segment: their K/V here (and in the segment's
        adapter) are computed now (lazily), exactly as the full model."""
        stk, w = self.stack, self.ee_chunk

        def single(_):
            h = jax.lax.dynamic_slice_in_dim(hin, cur, 1, axis=1)
            p = jax.lax.dynamic_slice_in_dim(slot_pos, cur, 1, axis=1)
            out, c = stk.run(s, params, h, p, None, cache)
            ho = jax.lax.dynamic_update_slice_in_dim(hout, out, cur, axis=1) if has_out else None
            oa, ac = stk.adapt(s, params, out, p, None, acache)
            return c, ac, ho, oa[:, 0]

        def chunked(_):
            def body(carry):
                c, ac, ho, h_cur = carry
                start = c.index
                h = jax.lax.dynamic_slice_in_dim(hin, start, w, axis=1)
                p = jax.lax.dynamic_slice_in_dim(slot_pos, start, w, axis=1)
                valid = (start + jnp.arange(w) <= cur)[None, :] & (p >= 0)
                out, c = stk.run(s, params, h, jnp.maximum(p, 0), valid, c)
                if has_out:
                    ho = jax.lax.dynamic_update_slice_in_dim(ho, out, start, axis=1)
                oa, ac = stk.adapt(s, params, out, jnp.maximum(p, 0), valid, ac)
                here = jax.lax.dynamic_index_in_dim(oa, jnp.clip(cur - start, 0, w - 1),
                                                    axis=1, keepdims=False)
                h_cur = jnp.where(cur < start + w, here, h_cur)
                end = jnp.minimum(start + w, cur + 1)
                return (c.replace(index=end), None if ac is None else ac.replace(index=end),
                        ho, h_cur)

            h0 = jnp.zeros((hin.shape[0], hin.shape[2]), hin.dtype)
            return jax.lax.while_loop(lambda c: c[0].index <= cur, body,
                                      (cache, acache, hout, h0))

        return jax.lax.cond(cache.index == cur, single, chunked, None)

    # -- self-speculative --------------------------------------------------------------------
    def _spec_round(self, params, st: DecodeState, ctl: Control) -> DecodeState:
        """One draft + verify round; every row keeps its own cache length (`KVCache.index`
        `[B]`), draft window and output offset (module `engine` docstring)."""
        stk, wd, greedy = self.stack, self.max_draft, self.greedy
        key, k_draft, k_acc = jax.random.split(st.key, 3)
        active = ~st.done
        lo, hi = st.caches
        alo = st.acaches[0]  # the draft's exit adapter (None: the draft is the bare exit)
        b = st.last.shape[0]
        rows = jnp.arange(b)
        cur = lo.index  # [B]
        n = jnp.clip(jnp.minimum(st.draft_len, ctl.max_new - st.n), 1, wd)  # [B]
        n_max = jnp.max(jnp.where(active, n, 1))
        d, v = stk.config.hidden_size, stk.config.vocab_size

        def draft_body(c):
            j, cache, acache, tok, hb, drafts, qs, k = c
            h, cache = stk.run(0, params, stk.embed(params, tok[:, None]),
                               (st.pos + j)[:, None], None, cache)
            hb = jax.lax.dynamic_update_slice_in_dim(hb, h, j, axis=1)
            ha, acache = stk.adapt(0, params, h, (st.pos + j)[:, None], None, acache)
            lg = stk.head(params, ha[:, 0])
            k, sk = jax.random.split(k)
            tok = select(sk, lg, ctl.sampling, greedy)
            drafts = jax.lax.dynamic_update_slice_in_dim(drafts, tok[:, None], j, axis=1)
            if not greedy:
                qs = jax.lax.dynamic_update_slice_in_dim(
                    qs, probs_of(lg, ctl.sampling)[:, None], j, axis=1)
            return j + 1, cache, acache, tok, hb, drafts, qs, k

        # Rows draft until the longest window is full; a row's drafts past its own window are
        # never verified, and their K/V lie past its length (masked, then overwritten).
        init = (jnp.zeros((), jnp.int32), lo, alo, st.last,
                jnp.zeros((b, wd + 1, d), stk.dtype), jnp.zeros((b, wd), jnp.int32),
                None if greedy else jnp.zeros((b, wd, v), jnp.float32), k_draft)
        _, lo, alo, _, hb, drafts, qs, _ = jax.lax.while_loop(lambda c: c[0] < n_max,
                                                              draft_body, init)
        # Verify: layers [0, k) for each row's last draft d_n (at its own slot cur + n), then
        # layers [k, L) for the last committed token + n drafts at once (padding masked).
        d_n = jnp.take_along_axis(drafts, (n - 1)[:, None], axis=1)
        h, lo = stk.run(0, params, stk.embed(params, d_n), (st.pos + n)[:, None], None,
                        lo.replace(index=cur + n))
        if alo is not None:  # the adapter's K/V of d_n too, so its cache keeps pace
            _, alo = stk.adapt(0, params, h, (st.pos + n)[:, None], None,
                               alo.replace(index=cur + n))
        hb = hb.at[rows, n].set(h[:, 0])
        idx = jnp.arange(wd + 1)
        valid = idx[None, :] <= n[:, None]
        hv, hi = stk.run(1, params, hb, st.pos[:, None] + idx, valid, hi)
        logits = stk.head(params, hv)  # [B, W, V]
        if greedy:
            a, corr = greedy_accept(logits, drafts, n)
        else:
            a, corr = speculative_accept(k_acc, probs_of(logits, ctl.sampling), qs, drafts, n)
        if self.spec_commit == "lockstep":  # every row stops where the slowest row did
            cut = jnp.broadcast_to(jnp.min(jnp.where(active, a, wd)), (b,))
            all_in = jnp.broadcast_to(jnp.all(jnp.where(active, a >= n, True)), (b,))
        else:
            cut, all_in = a, a >= n
        count = cut + 1
        d_pad = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
        # token at position cut + 1: the row's next accepted draft (lockstep, a > cut), else
        # its correction / bonus token
        nxt = jnp.where(a > cut, jnp.take_along_axis(d_pad, cut[:, None], axis=1)[:, 0], corr)
        y = jnp.where(idx[None, :] < cut[:, None], d_pad, nxt[:, None])
        act = active.astype(jnp.int32)
        old = st.stats
        stats = SpecCounts(rounds=old.rounds + 1, drafted=old.drafted + jnp.sum(n * act),
                           accepted=old.accepted + jnp.sum(a * act),
                           committed_drafts=old.committed_drafts + jnp.sum(cut * act),
                           draft_passes=old.draft_passes + n_max + 1,
                           row_committed=old.row_committed + cut * act,
                           row_rounds=old.row_rounds + act)
        grown = jnp.clip(jnp.where(all_in, st.draft_len + 2, st.draft_len - 1), 1, wd)
        step = jnp.where(active, count, 0)
        st = st.replace(caches=(lo.replace(index=cur + step), hi.replace(index=cur + step)),
                        acaches=(None if alo is None else alo.replace(index=cur + step), None),
                        key=key, stats=stats,
                        draft_len=jnp.where(active, grown, st.draft_len))
        upd = _commit(st, y, count, ctl)
        return st.replace(last=jnp.where(active, nxt, st.last), pos=st.pos + step, **upd)


@functools.cache
def _jitted(compiler_options: tuple) -> dict[str, Callable]:
    """`Programs`' jitted functions for one set of XLA compiler options (`self` static; the
    decode state is donated to `loop` and `step`)."""
    opts = dict(compiler_options) or None
    return {
        "prefill": jax.jit(Programs._prefill, static_argnames=("self", "slots"),
                           compiler_options=opts),
        "loop": jax.jit(Programs._loop, static_argnames=("self",), donate_argnames=("st",),
                        compiler_options=opts),
        "step": jax.jit(Programs._step, static_argnames=("self",), donate_argnames=("st",),
                        compiler_options=opts),
        "insert": jax.jit(Programs._insert, static_argnames=("self",), donate_argnames=("st",),
                          compiler_options=opts),
    }
