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

from sorted_jax.decoding.inplace import run_if
from sorted_jax.decoding.options import Route
from sorted_jax.decoding.sampling import select, top1_prob
from sorted_jax.decoding.speculative import PROBE_MIN, spec_round, verify_widths
from sorted_jax.decoding.state import (
    Control,
    DecodeState,
    LadderCounts,
    SpecCounts,
    Stack,
    commit,
)
from sorted_jax.model.config import LlamaConfig

Array = jax.Array
EE_STRETCH_MIN, EE_STRETCH_MAX = 8, 64  # early exit: steps a batch goes unchecked (`_watch`)
# Early exit: a step runs every segment in one loop (`Programs._eager`) while the ladder's
# recent steps skipped under this fraction of the layers: about what a loop and a branch per
# segment cost on a CPU (the ladder measured 1.09-1.15x the full model's step at batch 16).
EAGER_SAVING = 0.15


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
    speculation: str = "dynamic"  # speculative: "dynamic" | "always" (`speculative`)
    compiler_options: tuple[tuple[str, Any], ...] = ()
    config_key: tuple = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "config_key", _freeze(self.config.to_hf_dict()))

    @classmethod
    def make(cls, config: LlamaConfig, route: Route, *, greedy: bool, dtype: Any, cache_dtype: Any,
             attention_impl: str, ee_chunk: int, max_draft: int, spec_commit: str = "per-row",
             speculation: str = "dynamic", compiler_options: tuple = ()) -> Programs:
        ladder = route.kind == "ladder"
        return cls(config, route.bounds, route.kind, bool(greedy), jnp.dtype(dtype).name,
                   jnp.dtype(cache_dtype).name, attention_impl,
                   ee_chunk if ladder and len(route.bounds) > 1 else 0,
                   0 if ladder else max_draft, "" if ladder else spec_commit,
                   "" if ladder else speculation, tuple(compiler_options))

    @functools.cached_property
    def stack(self) -> Stack:
        return Stack(self.config, self.bounds, jnp.dtype(self.dtype), self.attention_impl)

    @property
    def widths(self) -> tuple[int, ...]:
        """Speculative: the compiled verify widths (`speculative.verify_widths`)."""
        return verify_widths(self.max_draft, self.speculation)

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
            "last", "pos", "n", "out", "length", "done", "draft_len", "accept")}
        return st.replace(caches=caches, acaches=acaches, stats=stats, **rows)

    def _advance(self, params, st: DecodeState, ctl: Control) -> DecodeState:
        if self.kind == "ladder":
            return self._ladder_step(params, st, ctl)
        return spec_round(self, params, st, ctl)

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
        cdt = jnp.dtype(self.cache_dtype)
        acaches = list(stk.init_adapter_caches(b, slots, cdt, per_row=per_row))
        h = stk.embed(params, ids)
        last_h = []
        if per_row:  # a cache per segment
            caches = list(stk.init_caches(b, slots, cdt, per_row=True))
            for s in range(len(stk.bounds)):
                h, caches[s] = stk.run(s, params, h, positions, valid, caches[s])
                ha, acaches[s] = stk.adapt(s, params, h, positions, valid, acaches[s])
                last_h.append(ha[:, -1])
        else:  # one cache, its segments' rows written in turn from slot 0
            cache = stk.init_shared_cache(b, slots, cdt)
            for s in range(len(stk.bounds)):
                h, cache = stk.run(s, params, h, positions, valid,
                                   cache.replace(index=jnp.zeros((), jnp.int32)), shared=True)
                ha, acaches[s] = stk.adapt(s, params, h, positions, valid, acaches[s])
                last_h.append(ha[:, -1])
            caches = [cache]
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
            draft_len=jnp.full((b,), min(4, self.max_draft), jnp.int32),
            accept=jnp.tile(jnp.asarray([[1.0, 2.0]], jnp.float32), (b, 1)),
            plain=jnp.asarray([0, PROBE_MIN], jnp.int32),
            frontiers=jnp.full((len(stk.bounds),), p, jnp.int32),
            ee_watch=jnp.asarray([256 * self.bounds[-1][1], 0, 0], jnp.int32),
            stats=stats)
        return st.replace(**commit(st, tok[:, None], jnp.ones((), jnp.int32), ctl))

    def _choose_exit(self, logits_per_exit, ctl, decided):
        """First exit whose top-1 prob passes its threshold (the last always accepts)."""
        m = len(logits_per_exit)
        logits, exit_idx = logits_per_exit[-1], jnp.full(decided.shape, m - 1, jnp.int32)
        for s in reversed(range(m - 1)):
            ok = top1_prob(logits_per_exit[s]) >= ctl.thresholds[s]
            logits = jnp.where(ok[:, None], logits_per_exit[s], logits)
            exit_idx = jnp.where(ok, s, exit_idx)
        return logits, exit_idx

    def _exit_stats(self, old, exit_idx, active, path=None):
        m = self.exit_layers.shape[0]
        hist = jnp.sum(jax.nn.one_hot(exit_idx, m, dtype=jnp.int32) * active[:, None], axis=0)
        layer_sum = jnp.sum(jnp.where(active, self.exit_layers[exit_idx], 0))
        paths = (jnp.zeros((3,), jnp.int32) if path is None
                 else jax.nn.one_hot(path, 3, dtype=jnp.int32) * jnp.any(active))
        if old is None:
            return LadderCounts(hist, layer_sum, paths)
        return LadderCounts(old.exit_hist + hist, old.exit_layer_sum + layer_sum,
                            old.paths + paths)

    # -- fixed / early exit ------------------------------------------------------------------
    def _ladder_step(self, params, st: DecodeState, ctl: Control) -> DecodeState:
        """One token: segment after segment, each row stopping at its first exit whose
        confidence passes (`engine`). The batch checks only while `ee_watch` says checks pay
        (`_watch`), and an exit's head runs only when the batch checks and the exit's
        threshold can pass (<= 1). While the ladder would skip few layers (some row nearly
        always needs the deepest segment: large batches) and no segment lags, the step runs
        every segment in one loop instead (`_eager`: the same exits, logits and K/V, without
        a loop and a branch per segment)."""
        stk = self.stack
        m = len(stk.bounds)
        key, k_sel = jax.random.split(st.key)
        active = ~st.done
        x = stk.embed(params, st.last[:, None])
        if m == 1:
            cache, acache = st.caches[0], st.acaches[0]
            h, cache = stk.run(0, params, x, st.pos[:, None], None, cache, shared=True)
            ha, acache = stk.adapt(0, params, h, st.pos[:, None], None, acache)
            logits = stk.head(params, ha[:, 0])
            exit_idx = jnp.zeros(st.last.shape, jnp.int32)
            st = st.replace(caches=(cache,), acaches=(acache,))
        else:
            checking = (st.ee_watch[1] == 0) | (ctl.ee_min_saved <= 0)
            check = active & checking
            shape = (st.last.shape[0], stk.config.vocab_size)

            def checked(s, h):
                """(this exit's rows that pass, its logits: zeros where nobody checks)."""
                need = jnp.any(check) & (ctl.thresholds[s] <= 1.0)
                lg = jax.lax.cond(need, lambda h: stk.head(params, h),
                                  lambda h: jnp.zeros(shape, jnp.float32), h)
                return check & need & (top1_prob(lg) >= ctl.thresholds[s]), lg

            cur = st.frontiers[0]
            top = self.bounds[-1][1]
            synced = jnp.all(st.frontiers == cur)
            # nobody checks: the full model's step; few layers to skip: one loop, then the
            # checks; else the ladder
            plain = synced & ~jnp.any(check)
            eager = synced & ~plain & (st.ee_watch[0] < self._eager_below)
            carry = (st, jnp.zeros(shape, jnp.float32), jnp.zeros(st.last.shape, jnp.int32))
            carry = run_if(plain, lambda c: self._eager(params, c[0], x, None, active), carry)
            def check_all(hs):
                """`checked` for the stacked states `[m - 1, B, D]` of every exit but the
                last: (rows that pass `[m - 1, B]`, logits `[m - 1, B, V]`)."""
                k, b = hs.shape[:2]
                lg = stk.head(params, hs.reshape(k * b, -1)).reshape(k, b, -1)
                th = ctl.thresholds[:k, None]
                return check[None] & (th <= 1.0) & (top1_prob(lg) >= th), lg

            carry = run_if(eager, lambda c: self._eager(params, c[0], x, check_all, active),
                           carry)
            carry = run_if(~plain & ~eager,
                           lambda c: self._ladder(params, c[0], x, checked, active), carry)
            st, logits, exit_idx = carry
            path = jnp.where(plain, 2, jnp.where(eager, 1, 0))
            deepest = jnp.max(jnp.where(active, self.exit_layers[exit_idx], 0))
            saved = jnp.where(jnp.any(active), top - deepest, 0)
            st = st.replace(ee_watch=self._watch(st.ee_watch, checking, saved,
                                                 ctl.ee_min_saved))
        tok = select(k_sel, logits, ctl.sampling, self.greedy)
        st = st.replace(key=key, stats=self._exit_stats(st.stats, exit_idx, active,
                                                        None if m == 1 else path))
        upd = commit(st, tok[:, None], jnp.ones((), jnp.int32), ctl)
        return st.replace(last=tok, pos=st.pos + 1, **upd)

    @property
    def _eager_below(self) -> int:
        """`ee_watch`'s mean saving (x 256) under which a step runs `_eager`: EAGER_SAVING of
        the route's layers."""
        return int(EAGER_SAVING * 256 * self.bounds[-1][1])

    def _eager(self, params, st: DecodeState, x: Array, checked, active: Array) -> tuple:
        """Every segment in one loop (no segment lags): then every exit's check at once
        (`checked` of the stacked exit states), or (`checked` None: nobody checks) the last
        exit's logits alone. (state, logits, exit index per row)."""
        stk = self.stack
        m = len(stk.bounds)
        cur = st.frontiers[0]
        pos = st.pos[:, None]
        # an unchecked step needs the exits' states only to keep their adapters' caches
        collect = checked is not None or any(a is not None for a in stk.adapter_rows[:-1])
        states, h, cache = stk.run_all(params, x, pos, st.caches[0].replace(index=cur),
                                       collect=collect)
        acaches = list(st.acaches)
        outs = []
        for s in range(m):
            if s < m - 1 and states is None:
                outs.append(None)
                continue
            ha, acaches[s] = stk.adapt(s, params, states[s] if s < m - 1 else h, pos, None,
                                       acaches[s])
            outs.append(ha[:, 0])
        st = st.replace(caches=(cache,), acaches=tuple(acaches),
                        frontiers=jnp.full_like(st.frontiers, cur + 1))
        if checked is None:
            return st, stk.head(params, outs[-1]), jnp.full(st.last.shape, m - 1, jnp.int32)
        # every exit's check at once (one head over the stacked states): each row takes its
        # first passing exit, else the last; finished rows count as decided at the first, as
        # in the ladder
        ok, lg = checked(jnp.stack(outs[:-1]))
        ok = ok.at[0].set(ok[0] | ~active)
        first = jnp.argmax(ok, axis=0).astype(jnp.int32)
        early = jnp.any(ok, axis=0)
        chosen = jnp.take_along_axis(lg, first[None, :, None], axis=0)[0]
        logits = jnp.where(early[:, None], chosen, stk.head(params, outs[-1]))
        return st, logits, jnp.where(early, first, m - 1)

    def _ladder(self, params, st: DecodeState, x: Array, checked, active: Array) -> tuple:
        """Segment after segment over the shared cache, a deeper one only while a row has not
        exited; each flushes its pending slots first (`_flush`). (state, logits, exit index
        per row)."""
        stk = self.stack
        m = len(stk.bounds)
        fr = st.frontiers
        cur = fr[0]
        acaches, hbuf = list(st.acaches), list(st.hbuf)
        h, cache = stk.run(0, params, x, st.pos[:, None], None,
                           st.caches[0].replace(index=cur), shared=True)
        ha, acaches[0] = stk.adapt(0, params, h, st.pos[:, None], None, acaches[0])
        hbuf[0] = jax.lax.dynamic_update_slice_in_dim(hbuf[0], h, cur, axis=1)
        slot_pos = cache.positions
        fr = fr.at[0].set(cur + 1)
        exit_idx = jnp.zeros(st.last.shape, jnp.int32)
        decided, logits = checked(0, ha[:, 0])
        decided = decided | ~active
        for s in range(1, m):
            has_out = s < m - 1

            def deeper(carry, s=s, has_out=has_out):
                cache, fr, acache, hout, logits, decided, exit_idx = carry
                cache, acache, hout, h_cur = self._flush(
                    s, params, cache.replace(index=fr[s]), acache, hbuf[s - 1], hout, slot_pos,
                    cur, has_out)
                fr = fr.at[s].set(cache.index)
                if has_out:
                    passed, lg = checked(s, h_cur)
                else:
                    passed, lg = True, stk.head(params, h_cur)
                take = ~decided
                logits = jnp.where(take[:, None], lg, logits)
                exit_idx = jnp.where(take, s, exit_idx)
                return cache, fr, acache, hout, logits, decided | passed, exit_idx

            carry = (cache, fr, acaches[s], hbuf[s] if has_out else None, logits, decided,
                     exit_idx)
            carry = run_if(~jnp.all(decided), deeper, carry)
            cache, fr, acaches[s], hout, logits, decided, exit_idx = carry
            if has_out:
                hbuf[s] = hout
        st = st.replace(caches=(cache.replace(index=cur + 1),), acaches=tuple(acaches),
                        hbuf=tuple(hbuf), frontiers=fr)
        return st, logits, exit_idx

    @staticmethod
    def _watch(watch: Array, checking: Array, saved: Array, min_saved: Array) -> Array:
        """The batch's check schedule `ee_watch` = (mean, left, stretch), per step. A checked
        step skipped `saved` layers for the whole batch (a segment runs while any unfinished
        row has not exited); mean = (3 mean + 256 saved) // 4, starting at all L layers.
        When the mean falls below `min_saved` the checks cost more than they save: the batch
        runs unchecked steps (the full model's tokens) for a stretch of EE_STRETCH_MIN steps,
        then checks one step (a probe, whose saving replaces the mean); the stretch doubles
        up to EE_STRETCH_MAX while probes fail and resets when checks pay again. Integer
        arithmetic: a schedule is exactly reproducible (tests replay it)."""
        mean, left, stretch = watch[0], watch[1], watch[2]
        mean = jnp.where(stretch > 0, 256 * saved, (3 * mean + 256 * saved) // 4)
        low = mean < min_saved
        longer = jnp.clip(2 * stretch, EE_STRETCH_MIN, EE_STRETCH_MAX)
        after_check = jnp.stack([mean, jnp.where(low, longer, 0), jnp.where(low, longer, 0)])
        unchecked = jnp.stack([watch[0], jnp.maximum(left - 1, 0), stretch])
        return jnp.where(checking, after_check, unchecked).astype(jnp.int32)

    def _flush(self, s, params, cache, acache, hin, hout, slot_pos, cur, has_out):
        """Run segment s over its pending slots [cache.index, cur] of the shared cache;
        returns the current token's state for segment s's logits (through its exit adapter,
        if any). Pending slots are tokens that exited below this segment: their K/V here (and
        in the segment's adapter) are computed now (lazily), exactly as the full model."""
        stk, w = self.stack, self.ee_chunk

        def single(carry):
            cache, acache, hout, _ = carry
            h = jax.lax.dynamic_slice_in_dim(hin, cur, 1, axis=1)
            p = jax.lax.dynamic_slice_in_dim(slot_pos, cur, 1, axis=1)
            out, c = stk.run(s, params, h, p, None, cache, shared=True)
            ho = jax.lax.dynamic_update_slice_in_dim(hout, out, cur, axis=1) if has_out else None
            oa, ac = stk.adapt(s, params, out, p, None, acache)
            return c, ac, ho, oa[:, 0]

        def chunked(carry):
            def body(carry):
                c, ac, ho, h_cur = carry
                start = c.index
                h = jax.lax.dynamic_slice_in_dim(hin, start, w, axis=1)
                p = jax.lax.dynamic_slice_in_dim(slot_pos, start, w, axis=1)
                valid = (start + jnp.arange(w) <= cur)[None, :] & (p >= 0)
                out, c = stk.run(s, params, h, jnp.maximum(p, 0), valid, c, shared=True)
                if has_out:
                    ho = jax.lax.dynamic_update_slice_in_dim(ho, out, start, axis=1)
                oa, ac = stk.adapt(s, params, out, jnp.maximum(p, 0), valid, ac)
                here = jax.lax.dynamic_index_in_dim(oa, jnp.clip(cur - start, 0, w - 1),
                                                    axis=1, keepdims=False)
                h_cur = jnp.where(cur < start + w, here, h_cur)
                end = jnp.minimum(start + w, cur + 1)
                return (c.replace(index=end), None if ac is None else ac.replace(index=end),
                        ho, h_cur)

            return jax.lax.while_loop(lambda c: c[0].index <= cur, body, carry)

        h0 = jnp.zeros((hin.shape[0], hin.shape[2]), hin.dtype)
        one = cache.index == cur
        carry = run_if(one, single, (cache, acache, hout, h0))
        return run_if(~one, chunked, carry)


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
