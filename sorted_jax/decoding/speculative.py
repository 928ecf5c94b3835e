"""Self-speculative decoding: one draft + verify round, and the policy that decides, round by
round, whether drafting pays.

A round drafts n tokens with layers [0, k) and verifies them with one pass of layers [k, L)
of width w >= n + 1, one of a few compiled widths (`verify_widths`: 1, 2, 4 and
max_draft + 1); n = 0 is a plain full-model step of width 1. Wider verify passes are not free
on a compute-bound backend (a CPU runs every position of the chunk), so the verify width
follows the drafts instead of always being max_draft + 1.

`plan_drafts` ("dynamic", the default) picks the batch's n each round:

* each row's acceptance alpha_b = accepted / (accepted + rejected) drafts, both counts decayed
  by `ACCEPT_DECAY` per round (start: one accepted in two);
* a row expects E_b(n) = sum_{i<=n} alpha_b^i tokens from n drafts (greedy acceptance stops at
  the first rejection), at most the r_b it still has to make;
* a round of n drafts costs c(n) = n * draft_cost + verify_cost[w(n)], relative to a plain
  step, as measured for the batch's shape (`costs.measure`) or given;

and takes the best n over the unfinished rows: for a fixed batch (`generate`, which runs until
its slowest row ends) the most min_b E_b(n) / r_b per unit of cost (the batch's finishing
time), else (rows join as others leave: serving) the most sum_b E_b(n) per unit of cost.
Drafting must beat a plain step by DRAFT_MARGIN, against measurement noise; ties go to fewer
drafts. While plain steps win nothing is observed, so after `gap` plain rounds one round
probes (drafts the best n > 0); the gap doubles up to `PROBE_MAX` while probes do not switch
back, and resets when drafting wins on its own. "always" drafts every round with each row's
adaptive window and verifies at max_draft + 1 (the old behaviour, kept to reproduce old
figures). Whatever n is, verification is exact: greedy output equals the full model's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax.decoding.inplace import run_case, run_if
from sorted_jax.decoding.sampling import greedy_accept, probs_of, select, speculative_accept
from sorted_jax.decoding.state import Control, DecodeState, SpecCounts, commit

Array = jax.Array
SPECULATION = ("dynamic", "always")
ACCEPT_DECAY = 0.7  # per round: about the last three rounds' drafts dominate
PROBE_MIN, PROBE_MAX = 4, 64  # plain rounds before a probe
DRAFT_MARGIN = 1.1  # drafting's estimated rate must be this much above a plain step's


def verify_widths(max_draft: int, speculation: str) -> tuple[int, ...]:
    """The compiled verify widths (tokens per pass of layers [k, L))."""
    if speculation == "always":
        return (max_draft + 1,)
    return tuple(sorted({w for w in (1, 2, 4) if w <= max_draft} | {max_draft + 1}))


def width_index(widths: tuple[int, ...], max_draft: int) -> np.ndarray:
    """For n = 0..max_draft drafts: the index of the narrowest width >= n + 1."""
    return np.asarray([next(i for i, w in enumerate(widths) if w >= n + 1)
                       for n in range(max_draft + 1)], np.int32)


def plan_drafts(progs: Any, st: DecodeState, ctl: Control, active: Array
                ) -> tuple[Array, Array]:
    """(drafts per row `[B]`, the next `st.plain`) for this round (module docstring)."""
    wd = progs.max_draft
    rem = jnp.maximum(ctl.max_new - st.n, 1)
    forced = ctl.force_drafts >= 0
    if progs.speculation == "always":
        n = jnp.clip(jnp.minimum(st.draft_len, rem), 1, wd)
        return jnp.where(forced, ctl.force_drafts, n), st.plain
    alpha = st.accept[:, 0] / st.accept[:, 1]
    ns = jnp.arange(wd + 1)
    tokens = jnp.minimum(jnp.cumsum(alpha[:, None] ** ns, axis=1), rem[:, None])  # [B, n]
    throughput = jnp.sum(jnp.where(active[:, None], tokens, 0.0), axis=0)
    finish = jnp.min(jnp.where(active[:, None], tokens / rem[:, None], jnp.inf), axis=0)
    gain = jnp.where(ctl.spec_finish & jnp.any(active), finish, throughput)
    cost = ns * ctl.draft_cost + ctl.verify_cost[width_index(progs.widths, wd)]
    rate = gain / cost / jnp.where(ns > 0, DRAFT_MARGIN, 1.0)
    best = jnp.argmax(rate).astype(jnp.int32)
    run, gap = st.plain[0], st.plain[1]
    probe = (best == 0) & (run >= gap)
    pick = jnp.where(probe, jnp.argmax(rate[1:]).astype(jnp.int32) + 1, best)
    plain = jnp.where(pick == 0, jnp.stack([run + 1, gap]),
                      jnp.where(probe, jnp.stack([0, jnp.minimum(2 * gap, PROBE_MAX)]),
                                jnp.asarray([0, PROBE_MIN], jnp.int32)))
    n = jnp.where(forced, ctl.force_drafts, jnp.minimum(pick, rem))
    return n.astype(jnp.int32), jnp.where(forced, st.plain, plain).astype(jnp.int32)


def spec_round(progs: Any, params: dict, st: DecodeState, ctl: Control) -> DecodeState:
    """One round of `progs` (a `programs.Programs`): a plain full-model step when no row
    drafts (`plain_round`), else drafts + one verify pass (`drafted_round`). Every row keeps
    its own cache length (`KVCache.index` `[B]`), output offset and acceptance (`engine`)."""
    active = ~st.done
    n, plain = plan_drafts(progs, st, ctl, active)
    n_max = jnp.max(jnp.where(active, n, 0))
    st = run_if(n_max == 0, lambda s: plain_round(progs, params, s, ctl, plain), st)
    return run_if(n_max > 0, lambda s: drafted_round(progs, params, s, ctl, n, plain, n_max),
                  st)


def plain_round(progs: Any, params: dict, st: DecodeState, ctl: Control, plain: Array
                ) -> DecodeState:
    """One token per row through layers [0, k) then [k, L): the full model's step, and
    exactly what `drafted_round` does with n = 0 (same keys, same counts), minus the draft
    loop, the verify buffers and the width switch."""
    stk, wd = progs.stack, progs.max_draft
    key, _, k_acc = jax.random.split(st.key, 3)
    active = ~st.done
    lo, hi = st.caches
    alo = st.acaches[0]
    cur = lo.index
    pos = st.pos[:, None]
    h, lo = stk.run(0, params, stk.embed(params, st.last[:, None]), pos, None, lo)
    if alo is not None:  # the adapter's K/V of that token too, so its cache keeps pace
        _, alo = stk.adapt(0, params, h, pos, None, alo)
    h, hi = stk.run(1, params, h, pos, None, hi)
    tok = select(k_acc, stk.head(params, h[:, 0]), ctl.sampling, progs.greedy)
    act = active.astype(jnp.int32)
    old = st.stats
    stats = old.replace(rounds=old.rounds + 1, draft_passes=old.draft_passes + 1,
                        row_rounds=old.row_rounds + act, plain_rounds=old.plain_rounds + 1)
    st = st.replace(caches=(lo.replace(index=cur + act), hi.replace(index=cur + act)),
                    acaches=(None if alo is None else alo.replace(index=cur + act), None),
                    key=key, stats=stats, plain=plain,
                    draft_len=jnp.where(active, jnp.clip(st.draft_len + 2, 1, wd),
                                        st.draft_len))
    upd = commit(st, tok[:, None], jnp.ones((), jnp.int32), ctl)
    return st.replace(last=jnp.where(active, tok, st.last), pos=st.pos + act, **upd)


def drafted_round(progs: Any, params: dict, st: DecodeState, ctl: Control, n: Array,
                  plain: Array, n_max: Array) -> DecodeState:
    """Drafts `n [B]` tokens per row with layers [0, k), verifies them in one pass of
    layers [k, L), commits each row's accepted prefix and its correction / bonus token."""
    stk, wd, greedy, widths = progs.stack, progs.max_draft, progs.greedy, progs.widths
    key, k_draft, k_acc = jax.random.split(st.key, 3)
    active = ~st.done
    lo, hi = st.caches
    alo = st.acaches[0]  # the draft's exit adapter (None: the draft is the bare exit)
    b = st.last.shape[0]
    rows = jnp.arange(b)
    cur = lo.index  # [B]
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
    # Verify: layers [0, k) for each row's token at slot cur + n (its last draft; with no
    # drafts its last committed token: a plain step), then layers [k, L) for the last
    # committed token + n drafts at once, in the narrowest compiled width (padding masked).
    toks = jnp.concatenate([st.last[:, None], drafts], axis=1)
    d_n = jnp.take_along_axis(toks, n[:, None], axis=1)
    h, lo = stk.run(0, params, stk.embed(params, d_n), (st.pos + n)[:, None], None,
                    lo.replace(index=cur + n))
    if alo is not None:  # the adapter's K/V of that token too, so its cache keeps pace
        _, alo = stk.adapt(0, params, h, (st.pos + n)[:, None], None,
                           alo.replace(index=cur + n))
    hb = hb.at[rows, n].set(h[:, 0])

    def verify(w):
        def run(c):
            hi = c[2]
            idx = jnp.arange(w)
            hv, hi = stk.run(1, params, hb[:, :w], st.pos[:, None] + idx,
                             idx[None, :] <= n[:, None], hi)
            logits = stk.head(params, hv)  # [B, w, V]
            if greedy:
                a, corr = greedy_accept(logits, drafts[:, :w - 1], n)
            elif w == 1:
                a, corr = jnp.zeros((b,), jnp.int32), select(k_acc, logits[:, 0],
                                                             ctl.sampling, False)
            else:
                a, corr = speculative_accept(k_acc, probs_of(logits, ctl.sampling),
                                             qs[:, :w - 1], drafts[:, :w - 1], n)
            return a.astype(jnp.int32), corr.astype(jnp.int32), hi
        return run

    zero = jnp.zeros((b,), jnp.int32)
    branch = jnp.asarray(width_index(widths, wd))[n_max]
    a, corr, hi = run_case(branch, [verify(w) for w in widths], (zero, zero, hi))
    if progs.spec_commit == "lockstep":  # every row stops where the slowest row did
        cut = jnp.broadcast_to(jnp.min(jnp.where(active, a, wd)), (b,))
        all_in = jnp.broadcast_to(jnp.all(jnp.where(active, a >= n, True)), (b,))
    else:
        cut, all_in = a, a >= n
    count = cut + 1
    idx = jnp.arange(wd + 1)
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
                       row_rounds=old.row_rounds + act,
                       plain_rounds=old.plain_rounds + (n_max == 0))
    grown = jnp.clip(jnp.where(all_in, st.draft_len + 2, st.draft_len - 1), 1, wd)
    seen = active & (n > 0)  # rows whose drafts were verified: update their acceptance
    obs = jnp.stack([a, a + (a < n)], axis=-1).astype(jnp.float32)
    accept = jnp.where(seen[:, None], ACCEPT_DECAY * st.accept + obs, st.accept)
    step = jnp.where(active, count, 0)
    st = st.replace(caches=(lo.replace(index=cur + step), hi.replace(index=cur + step)),
                    acaches=(None if alo is None else alo.replace(index=cur + step), None),
                    key=key, stats=stats, accept=accept, plain=plain,
                    draft_len=jnp.where(active, grown, st.draft_len))
    upd = commit(st, y, count, ctl)
    return st.replace(last=jnp.where(active, nxt, st.last), pos=st.pos + step, **upd)
