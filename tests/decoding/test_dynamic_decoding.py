"""Decoding that never loses: dynamic speculation (draft only when it pays, verify widths that
follow the drafts) and early exit that stops checking rows whose checks do not pay.

Greedy speculative output must equal the full model's whatever the rounds do: rows of
different prompt lengths, rounds switching between plain steps and drafting (by the policy
under given costs, or forced round by round), rows joining a running batch, exit adapters.
Early exit with skipped checks must equal a reference that recomputes every exit's logits
without a cache and applies the same per-row check schedule.
"""

from __future__ import annotations

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FAST, GQA_4L

from sorted_jax.core.errors import DecodeError
from sorted_jax.decoding import Decoder
from sorted_jax.decoding.costs import SpecCosts
from sorted_jax.decoding.programs import EE_STRETCH_MAX, EE_STRETCH_MIN
from sorted_jax.decoding.speculative import DRAFT_MARGIN, PROBE_MAX, PROBE_MIN, plan_drafts
from sorted_jax.model.modeling import make_model

MAX_NEW, MAX_LEN = 20, 32
ADAPTED = GQA_4L.replace(exit_adapters=(1, 2))
CHEAP = SpecCosts(0.001, {1: 1.0, 2: 1.0, 4: 1.0, 7: 1.0})  # drafting (nearly) free
DEAR = SpecCosts(0.45, {1: 1.0, 2: 1.7, 4: 2.9, 7: 4.5})  # drafting pays only near alpha = 1
MIDDLE = SpecCosts(0.25, {1: 1.0, 2: 1.25, 4: 1.6, 7: 2.2})


@pytest.fixture(scope="module")
def params():
    return helpers.random_params(GQA_4L, 0, std=0.08, as_jax=True)


@pytest.fixture(scope="module")
def adapted():
    return helpers.random_params(ADAPTED, 4, std=0.08, as_jax=True)


def prompts_of(seed: int, n: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, 96, rng.integers(1, 8)).tolist() for _ in range(n)]


def decoder(params, config=GQA_4L, **kw) -> Decoder:
    kw.setdefault("max_draft", 6)
    return Decoder(params, config, compiler_options=FAST, **kw)


KW = dict(max_new_tokens=MAX_NEW, max_len=MAX_LEN)


# ---------------------------------------------------------------------------------------------
# Dynamic speculation


def test_policy_switches_and_output_equals_full(params):
    """Under given costs the policy drafts, steps plainly, probes and switches back within
    one run, at different points of each row's own sequence (prompts of different lengths);
    every row equals the full model's greedy output. Cheaper drafting, fewer plain rounds."""
    switched, plain = 0, {}
    for costs, draft in ((CHEAP, 2), (MIDDLE, 3), (DEAR, 2), (MIDDLE, 1)):
        dec = decoder(params, spec_costs=costs)
        prompts = prompts_of(draft, 6)
        full = dec.generate(prompts, **KW)
        spec = dec.generate(prompts, mode="speculative", draft_layer=draft, **KW)
        assert spec.tokens == full.tokens, costs
        s = spec.stats
        rounds = s.full_passes - 1
        switched += 0 < s.plain_rounds < rounds
        plain[costs is CHEAP, costs is DEAR] = s.plain_rounds / rounds
        assert s.drafted > 0  # drafting won somewhere, or a probe drafted
        assert not dec.measured_costs  # given costs: nothing timed
    assert plain[True, False] < plain[False, True]
    assert plain[False, True] > 0.5  # dear drafting: mostly plain steps, with probes
    assert switched >= 2


def test_forced_rounds_and_joining_rows_equal_full(params, adapted):
    """Round by round forced draft counts (0 = a plain step of width 1; 1, 3 and 6 reach
    every compiled verify width), a row joining mid-batch, with and without exit adapters
    (the draft's adapter cache must keep pace through plain steps too)."""
    schedule = [0, 3, 0, 0, 6, 1, 2, 0, 4, 5, 1, 0, 6, 0]
    for p, cfg, draft in ((params, GQA_4L, 2), (adapted, ADAPTED, 1), (adapted, ADAPTED, 2)):
        dec = decoder(p, cfg, spec_costs=MIDDLE)
        prompts = prompts_of(11, 3)
        joiner = [1, 20, 21, 22, 23, 24, 25]
        want = dec.generate([*prompts, joiner], **KW).tokens
        run = dec.start(prompts, mode="speculative", draft_layer=draft, **KW)
        run.advance()
        r = 0
        while not run.done.all() or r < 3:
            if r == 3:  # row 1 is replaced by a new prompt: it joins at the next round
                run.evict(1)
                run.insert(1, joiner)
            run.advance(drafts=schedule[r % len(schedule)])
            r += 1
        assert run.tokens[0] == want[0] and run.tokens[2] == want[2]
        assert run.tokens[1] == want[3]
        st = run.stats()
        assert st.plain_rounds > 0 and st.drafted > 0
    with pytest.raises(DecodeError, match="drafts must be in 0..6"):
        run.advance(drafts=7)


def test_measured_costs_and_always(params):
    """No costs given: they are measured once per batch shape (a plain step is 1, a wider
    verify pass never cheaper than a narrower one); output still equals the full model's.
    `speculation="always"` verifies at max_draft + 1 every round, as before."""
    dec = decoder(params)
    prompts = prompts_of(5, 4)
    full = dec.generate(prompts, **KW)
    assert dec.generate(prompts, mode="speculative", draft_layer=2, **KW).tokens == full.tokens
    dec.generate(prompts, mode="speculative", draft_layer=2, **KW)
    (costs,) = dec.measured_costs.values()  # measured once for this shape
    verify = [costs.verify[w] for w in (1, 2, 4, 7)]
    assert verify[0] == 1.0 and verify == sorted(verify) and costs.draft > 0
    always = decoder(params, speculation="always").generate(
        prompts, mode="speculative", draft_layer=2, **KW)
    assert always.tokens == full.tokens and always.stats.plain_rounds == 0
    with pytest.raises(DecodeError, match="speculation must be one of"):
        decoder(params, speculation="sometimes")
    with pytest.raises(DecodeError, match="no verify cost for width"):
        decoder(params, spec_costs=SpecCosts(0.1, {1: 1.0, 2: 1.1})).generate(
            prompts, mode="speculative", **KW)


def test_plan_drafts_picks_the_best_rate_and_probes(params):
    """The policy's arithmetic on a real prefilled state: tokens per unit of cost over the
    unfinished rows (summed, or the slowest row's for a fixed batch's finishing time),
    drafting held to DRAFT_MARGIN above a plain step, ties to fewer drafts; probes after
    `gap` plain rounds, the gap doubling."""
    dec = decoder(params, spec_costs=MIDDLE)
    opts = dec.options(mode="speculative", draft_layer=2, **KW)
    _, progs, p, ctl, inputs, slots = dec._start(prompts_of(3, 2), opts)
    st = progs.prefill(p, *inputs, slots=slots)
    ctl = dec._costed(progs, st, ctl, "loop")
    active = jnp.asarray([True, True])
    rem = MAX_NEW - 1  # both rows made their first token at the prefill

    def plan(alpha, plain=(0, PROBE_MIN), act=active, finish=False):
        s = st.replace(accept=jnp.asarray([[a, 1.0] for a in alpha], jnp.float32),
                       plain=jnp.asarray(plain, jnp.int32))
        n, nxt = plan_drafts(progs, s, ctl.replace(spec_finish=jnp.asarray(finish)), act)
        return [int(x) for x in n], [int(x) for x in nxt]

    def best(alpha, finish=False):  # by hand
        cost = {n: n * 0.25 + MIDDLE.verify[w] for n, w in
                zip(range(7), (1, 2, 4, 4, 7, 7, 7), strict=True)}
        tokens = [[sum(a ** i for i in range(n + 1)) for n in range(7)] for a in alpha]
        gain = {n: min(t[n] / rem for t in tokens) if finish else sum(t[n] for t in tokens)
                for n in cost}
        rate = {n: gain[n] / c / (DRAFT_MARGIN if n else 1.0) for n, c in cost.items()}
        return max(rate, key=lambda n: (rate[n], -n))

    for alpha in ((0.95, 0.9), (0.6, 0.5), (0.9, 0.1), (0.99, 0.99), (0.99, 0.5)):
        for finish in (False, True):
            n, nxt = plan(alpha, finish=finish)
            assert n == [best(alpha, finish)] * 2, (alpha, finish)
            assert nxt == ([0, PROBE_MIN] if n[0] else [1, PROBE_MIN])
    # the slowest row decides a fixed batch: drafting pays for the sum, not for the finish
    assert plan((0.99, 0.5))[0][0] > 0 and plan((0.99, 0.5), finish=True)[0] == [0, 0]
    assert plan((0.1, 0.1)) == ([0, 0], [1, PROBE_MIN])  # plain
    n, nxt = plan((0.1, 0.1), plain=(PROBE_MIN, PROBE_MIN))  # gap reached: probe
    assert n[0] > 0 and nxt == [0, 2 * PROBE_MIN]
    assert plan((0.1, 0.1), plain=(PROBE_MAX, PROBE_MAX))[1] == [0, PROBE_MAX]
    # a finished row's acceptance does not count
    assert plan((0.1, 0.99), act=jnp.asarray([True, False]))[0] == [0, 0]


# ---------------------------------------------------------------------------------------------
# Early exit with skipped checks


def _every_exit_logits(params, config):
    model = make_model(config)

    @jax.jit
    def f(ids, mask, last):
        hidden = model.apply({"params": params}, ids, attention_mask=mask).hidden
        h = jnp.take_along_axis(hidden, last[None, :, None, None], axis=2)
        return model.apply({"params": params}, h, method="head")[:, :, 0]  # [L, B, V]

    return f


def ee_reference(params, config, prompts, exits, thresholds, min_saving, max_new=MAX_NEW):
    """Greedy by recomputation with the engine's batch check schedule (`Programs._watch`):
    the first token (prefill) is always checked and not counted; a step's saving is the
    layers above the deepest exit any unfinished row took; an unchecked step's tokens come
    from the last exit. Returns (tokens, exit layers, unchecked tokens)."""
    f = _every_exit_logits(params, config)
    big_l = exits[-1]
    min_saved = int(np.ceil(min_saving * big_l * 256))
    mean, left, stretch = 256 * big_l, 0, 0
    seqs, outs = [list(p) for p in prompts], [[] for _ in prompts]
    done, layers, unchecked = [False] * len(prompts), [], 0
    for step in range(max_new):
        ids = np.zeros((len(seqs), MAX_LEN), np.int32)
        mask = np.zeros((len(seqs), MAX_LEN), bool)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = s, True
        logits = np.asarray(f(ids, mask, np.asarray([len(s) - 1 for s in seqs], np.int32)))
        checking = step == 0 or min_saved <= 0 or left == 0
        active = [i for i in range(len(seqs)) if not done[i]]
        deepest = 0
        for i in active:
            unchecked += not checking
            for j, e in enumerate(exits):
                lg = logits[e - 1, i]
                p = np.exp(lg - lg.max())
                if j == len(exits) - 1 or (checking and (p / p.sum()).max() >= thresholds[j]):
                    break
            deepest = max(deepest, e)
            tok = int(np.argmax(lg))
            layers.append(e)
            outs[i].append(tok)
            seqs[i].append(tok)
            done[i] = tok == 2
        if step > 0 and active and checking:
            saved = big_l - deepest
            mean = 256 * saved if stretch > 0 else (3 * mean + 256 * saved) // 4
            longer = int(np.clip(2 * stretch, EE_STRETCH_MIN, EE_STRETCH_MAX))
            left = stretch = longer if mean < min_saved else 0
        elif step > 0 and active:
            left = max(left - 1, 0)
    return outs, layers, unchecked


def test_early_exit_skipping_equals_reference(params):
    """A batch whose checks stop saving layers (some row always runs to the last exit) runs
    unchecked full-depth steps for doubling stretches, probing after each; the output equals
    the recomputing reference with the same schedule, and differs from checking every
    token. With every check kept (`ee_min_saving=0`) it is the paper's rule."""
    exits = [1, 2, 4]
    prompts = prompts_of(21, 5)
    dec = decoder(params, ee_min_saving=0.3, ee_chunk=2)
    every = decoder(params, ee_min_saving=0.0, ee_chunk=2)
    discriminated = False
    paths = np.zeros(3, int)  # steps of the paper's rule run as: ladder, one loop, unchecked
    # confidences of this near-uniform model (vocab 96) lie around 0.03-0.07: thresholds
    # where some, many or few tokens exit early
    for th in ([0.045, 0.04], [0.05, 0.045], [0.06, 0.04], [0.055, 0.05]):
        ref, layers, unchecked = ee_reference(params, GQA_4L, prompts, exits, th, 0.3)
        got = dec.generate(prompts, mode="early-exit", exits=exits, thresholds=th, **KW)
        assert got.tokens == ref, th
        assert got.stats.avg_exit_layer == pytest.approx(np.mean(layers))
        # the schedule skipped checks, except where nearly every token exits early
        assert (unchecked > 0) == (th != [0.045, 0.04]), (th, unchecked)
        assert (got.stats.unchecked_steps > 0) == (unchecked > 0)
        ref0, layers0, _ = ee_reference(params, GQA_4L, prompts, exits, th, 0.0)
        assert min(layers0) < 4  # some token exits early under the paper's rule
        res0 = every.generate(prompts, mode="early-exit", exits=exits, thresholds=th, **KW)
        assert res0.tokens == ref0
        st = res0.stats
        paths += (st.ladder_steps, st.one_loop_steps, st.unchecked_steps)
        discriminated |= ref0 != ref
    assert discriminated  # skipping changed some token: the check above can fail
    # both ways of running a checked step ran (and gave the reference's tokens), never an
    # unchecked one under the paper's rule
    assert paths[0] > 0 and paths[1] > 0 and paths[2] == 0, paths
    # thresholds above 1 can never pass: no head runs below the last exit, output = full
    full = dec.generate(prompts, **KW)
    assert dec.generate(prompts, mode="early-exit", exits=exits, thresholds=[1.5, 1.5],
                        **KW).tokens == full.tokens
    with pytest.raises(DecodeError, match=r"ee_min_saving must be in \[0, 1\]"):
        decoder(params, ee_min_saving=-1)
