"""Decoding: KV cache vs recompute, HF parity, fixed / early-exit / speculative, bad arguments.

Compile time dominates on CPU, so every test shares a few model shapes, batch sizes and cache
lengths, and the decoders compile with XLA's cheap optimisation level (programs are cached per
shape and shared across `Decoder` instances).
"""

from __future__ import annotations

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FAST, GQA_4L, MHA_6L, SMALL_VOCAB_4L

from sorted_jax.decoding import Decoder, default_exits, default_thresholds
from sorted_jax.decoding.engine import PAPER_THRESHOLDS
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.modeling import make_model, slice_layers

MAX_NEW = 12
MAX_LEN = 32  # cache slots: prompts padded to 8 + 12 new tokens fit; one shape for all tests

GQA, MHA = GQA_4L, MHA_6L


def random_params(config: LlamaConfig, seed: int, scale: float = 4.0) -> dict:
    """Random weights with spread-out logits (std-0.02 init makes near-uniform, tie-prone
    distributions) and random norm scales (ones would hide a skipped/doubled norm)."""
    return helpers.random_params(config, seed, std=0.02 * scale, as_jax=True)


def random_prompts(seed: int, n: int, lo: int = 1, hi: int = 8, vocab: int = 96):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, rng.integers(lo, hi)).tolist() for _ in range(n)]


def decoder(params, config, **kw) -> Decoder:
    kw.setdefault("max_draft", 6)
    return Decoder(params, config, compiler_options=FAST, **kw)


# ---------------------------------------------------------------------------------------------
# Reference: recompute the whole sequence without a cache at every step (one jitted shape)

_REF_T = 24


def _ref_logits_fn(config: LlamaConfig):
    model = make_model(config)

    @jax.jit(compiler_options=FAST)
    def f(params, ids, mask, last):
        hidden = model.apply({"params": params}, ids, attention_mask=mask).hidden  # [L,B,T,D]
        h = jnp.take_along_axis(hidden, last[None, :, None, None], axis=2)  # [L, B, 1, D]
        return model.apply({"params": params}, h, method="head")[:, :, 0]  # [L, B, V]

    return f


_REF_FNS: dict = {}


def _ref_fn(config: LlamaConfig):
    """Per config: f(params, ids [B, T], mask [B, T], last [B]) -> every exit's logits at
    position `last` of each row, `[L, B, V]`, by a full forward pass without cache."""
    key = config.to_hf_dict().__repr__()
    if key not in _REF_FNS:
        _REF_FNS[key] = _ref_logits_fn(config)
    return _REF_FNS[key]


def reference_decode(params, config, prompts, max_new, exits=None, thresholds=(), eos=2):
    """Greedy decoding by full recomputation; with `exits`, a token is emitted by the first
    exit whose top-1 softmax prob >= its threshold (the last exit always accepts)."""
    f = _ref_fn(config)
    exits = exits or [config.num_hidden_layers]
    seqs = [list(p) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    exit_layers, confs = [], []
    for _ in range(max_new):
        ids = np.zeros((len(seqs), _REF_T), np.int32)
        mask = np.zeros((len(seqs), _REF_T), bool)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = s, True
        last = np.asarray([len(s) - 1 for s in seqs], np.int32)
        logits = np.asarray(f(params, ids, mask, last))
        for i in range(len(seqs)):
            if done[i]:
                continue
            for j, e in enumerate(exits):
                lg = logits[e - 1, i]
                p = np.exp(lg - lg.max())
                p /= p.sum()
                if j < len(exits) - 1:
                    confs.append((j, float(p.max())))
                if j == len(exits) - 1 or p.max() >= thresholds[j]:
                    break
            tok = int(np.argmax(lg))
            exit_layers.append(e)
            outs[i].append(tok)
            seqs[i].append(tok)
            done[i] = tok == eos
    return outs, exit_layers, confs


@pytest.fixture(scope="module")
def gqa():
    return random_params(GQA, 0)


@pytest.fixture(scope="module")
def prompts3():
    return [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13, 14, 15], [1, 3]]


# ---------------------------------------------------------------------------------------------
# Plain decoding


def test_kv_cache_decoding_equals_recompute(gqa, prompts3):
    res = decoder(gqa, GQA).generate(prompts3, max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    ref, _, _ = reference_decode(gqa, GQA, prompts3, MAX_NEW)
    assert res.tokens == ref
    # rows of a batch are independent of each other (left padding is invisible)
    for p, t in zip(prompts3, res.tokens, strict=True):
        alone = decoder(gqa, GQA).generate([p, p, p], max_new_tokens=MAX_NEW, max_len=MAX_LEN)
        assert alone.tokens[0] == t


def test_fixed_depth_equals_truncated_model(gqa, prompts3):
    k = 2
    res = decoder(gqa, GQA).generate(prompts3, mode="fixed", exit_layer=k,
                                     max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    sub = GQA.submodel(k)
    ref, _, _ = reference_decode(slice_layers(gqa, 0, k), sub, prompts3, MAX_NEW)
    assert res.tokens == ref
    # layers >= k are never touched: poisoning them changes nothing
    poisoned = dict(gqa)
    poisoned["layers"] = jax.tree.map(lambda x: x.at[k:].set(jnp.nan), gqa["layers"])
    res2 = decoder(poisoned, GQA).generate(prompts3, mode="fixed", exit_layer=k,
                                           max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    assert res2.tokens == res.tokens
    # depth L is the full model
    full = decoder(gqa, GQA).generate(prompts3, max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    at_l = decoder(gqa, GQA).generate(prompts3, mode="fixed", exit_layer=4,
                                      max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    assert at_l.tokens == full.tokens


def test_eos_stops_rows_independently(gqa, prompts3):
    full = decoder(gqa, GQA).generate(prompts3, max_new_tokens=MAX_NEW, max_len=MAX_LEN,
                                      eos_id=[])
    row = full.tokens[1]
    i = next(i for i in range(2, len(row)) if row[i] not in row[:i])
    eos = row[i]  # a token row 1 makes first at step i + 1 becomes the EOS
    res = decoder(gqa, GQA).generate(prompts3, max_new_tokens=MAX_NEW, max_len=MAX_LEN,
                                     eos_id=eos)
    for t_full, t in zip(full.tokens, res.tokens, strict=True):
        cut = t_full.index(eos) + 1 if eos in t_full else len(t_full)
        assert t == t_full[:cut]
    assert res.tokens[1] == row[:i + 1]
    short = decoder(gqa, GQA).generate(prompts3, max_new_tokens=3, max_len=MAX_LEN, eos_id=[])
    assert short.tokens == [t[:3] for t in full.tokens]


def test_stream_equals_generate(gqa, prompts3):
    dec = decoder(gqa, GQA)
    for kw in ({}, {"mode": "speculative", "draft_layer": 2}):
        full = dec.generate(prompts3[:1], max_new_tokens=MAX_NEW, max_len=MAX_LEN, **kw)
        pieces = list(dec.stream(prompts3[0], max_new_tokens=MAX_NEW, max_len=MAX_LEN, **kw))
        assert sum(pieces, []) == full.tokens[0]
        assert dec.last_stats.tokens == len(full.tokens[0])


# ---------------------------------------------------------------------------------------------
# HF parity


def test_greedy_matches_hf_generate(hf_llama_factory):
    torch = pytest.importorskip("torch")
    from sorted_jax.model.hf_mapping import hf_to_params

    hf = hf_llama_factory(GQA, seed=3)
    params = hf_to_params(hf.state_dict(), GQA)
    prompts = random_prompts(7, 3, 2, 8)
    ours = decoder(params, GQA).generate(prompts, max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    for p, t in zip(prompts, ours.tokens, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=int),
                              max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2,
                              pad_token_id=0)
        assert out[0, len(p):].tolist() == t
    # HF's own left-padded batch (positions from the attention mask) gives the same rows
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                          eos_token_id=2, pad_token_id=0)
    for i, t in enumerate(ours.tokens):
        row = out[i, width:].tolist()
        assert row[:len(t)] == t


# ---------------------------------------------------------------------------------------------
# Early exit


def test_early_exit_thresholds_above_one_equal_full(gqa, prompts3):
    dec = decoder(gqa, GQA, ee_chunk=2)
    full = dec.generate(prompts3, max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    ee = dec.generate(prompts3, mode="early-exit", exits=[1, 2, 4], thresholds=[1.1, 1.1],
                      max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    assert ee.tokens == full.tokens
    assert ee.stats.avg_exit_layer == 4.0


def test_early_exit_lazy_kv_is_exact(gqa, prompts3):
    """Tokens that exit early get their upper-layer K/V computed later (lazily): every exit's
    logits must equal a full forward pass without cache, so the decode equals a reference
    that recomputes everything and picks the first confident exit."""
    exits = [1, 2, 4]
    ref_all, _, confs_seen = reference_decode(gqa, GQA, prompts3, MAX_NEW, exits=exits,
                                              thresholds=[2.0, 2.0])

    def between(j, q):  # a threshold midway between two observed confidences of exit j
        c = np.unique([c for jj, c in confs_seen if jj == j])
        i = int(q * (len(c) - 1))
        return float((c[i] + c[i + 1]) / 2)

    # chunk 2 < pending runs: exercises the chunk loop; every token checked (the paper's rule)
    dec = decoder(gqa, GQA, ee_chunk=2, ee_min_saving=0.0)
    confs = []
    for qa, qb in ((0.5, 0.5), (0.7, 0.3), (0.3, 0.7)):
        th = [between(0, qa), between(1, qb)]
        ref, layers, _ = reference_decode(gqa, GQA, prompts3, MAX_NEW, exits=exits,
                                          thresholds=th)
        got = dec.generate(prompts3, mode="early-exit", exits=exits, thresholds=th,
                           max_new_tokens=MAX_NEW, max_len=MAX_LEN)
        assert got.tokens == ref, th
        assert got.stats.avg_exit_layer == pytest.approx(np.mean(layers))
        assert sum(got.stats.exit_histogram.values()) == len(layers)
        confs.append(sorted(set(layers)))
    assert any(len(c) == 3 for c in confs), confs  # all three exits were used somewhere
    ref1, _, _ = reference_decode(gqa, GQA, prompts3, MAX_NEW, exits=exits,
                                  thresholds=[0.0, 0.0])
    got1 = dec.generate(prompts3, mode="early-exit", exits=exits, thresholds=[0.0, 0.0],
                        max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    assert got1.tokens == ref1 and got1.stats.avg_exit_layer == 1.0
    assert ref_all == reference_decode(gqa, GQA, prompts3, MAX_NEW)[0]


def test_default_exits_and_thresholds():
    assert default_exits(40) == (12, 16, 20, 24, 28, 32, 36, 40)
    assert default_exits(32) == (12, 16, 20, 24, 28, 32)
    assert default_exits(8)[-1] == 8 and default_exits(4) == (1, 2, 3, 4)
    assert default_thresholds(8) == PAPER_THRESHOLDS
    assert default_thresholds(3) == (0.95, 0.95)
    assert default_thresholds(10) == PAPER_THRESHOLDS + (0.7, 0.7)


# ---------------------------------------------------------------------------------------------
# Speculative


@pytest.mark.parametrize("config,seeds,draft,batch", [
    (GQA, (0, 1), 1, 8),
    (GQA, (3, 4), 2, 1),
    (GQA, (5,), 3, 3),
    (MHA, (0, 1), 2, 3),
    (MHA, (2,), 4, 8),
    (MHA, (3,), 1, 1),
])
def test_speculative_greedy_equals_full(config, seeds, draft, batch):
    """Per-row commit: every row of a batch of 1, 3 or 8 prompts of different lengths equals
    the full model's greedy output, while rows of one batch keep different draft counts."""
    accepted = drafted = 0
    rows_differ = batch == 1
    for seed in seeds:
        params = random_params(config, seed)
        dec = decoder(params, config, speculation="always")  # every round drafts: statistics
        prompts = random_prompts(100 + seed, 8 if batch > 1 else 3)
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            full = dec.generate(chunk, max_new_tokens=MAX_NEW, max_len=MAX_LEN)
            spec = dec.generate(chunk, mode="speculative", draft_layer=draft,
                                max_new_tokens=MAX_NEW, max_len=MAX_LEN)
            assert spec.tokens == full.tokens, (seed, i)
            accepted += spec.stats.accepted
            drafted += spec.stats.drafted
            assert spec.stats.full_passes <= max(len(t) for t in full.tokens)
            assert len(spec.stats.committed_per_row) == len(chunk)
            rows_differ |= len(set(spec.stats.committed_per_row)) > 1
    assert 0 < accepted < drafted  # both acceptances and rejections were exercised
    assert rows_differ  # rows of a batch really committed different numbers of drafts


def test_speculative_lockstep_equals_per_row(gqa):
    """The lockstep baseline (every row cut at the slowest row) is exact too, and commits no
    more drafts than per-row commit on the same batch."""
    prompts = random_prompts(7, 8)
    per_row = decoder(gqa, GQA, speculation="always").generate(
        prompts, mode="speculative", draft_layer=3, max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    lock = decoder(gqa, GQA, spec_commit="lockstep", speculation="always").generate(
        prompts, mode="speculative", draft_layer=3, max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    assert lock.tokens == per_row.tokens
    assert lock.stats.committed_drafts <= per_row.stats.committed_drafts
    assert lock.stats.full_passes >= per_row.stats.full_passes
    with pytest.raises(ValueError, match="spec_commit must be one of"):
        decoder(gqa, GQA, spec_commit="slowest")


def test_speculative_row_joins_running_batch(gqa):
    """A prompt inserted into a freed row of a running speculative batch (per-row cache
    lengths) decodes exactly as it does alone, and the other row is undisturbed."""
    p0, p1, p2 = [1, 5, 6, 7, 8], [1, 9], [1, 20, 21, 22, 23, 24, 25]
    dec = decoder(gqa, GQA)
    kw = dict(max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    want = dec.generate([p0, p2], **kw).tokens
    run = dec.start([p0, p1], mode="speculative", draft_layer=2, **kw)
    for _ in range(3):
        run.advance()
    run.evict(1)
    run.insert(1, p2)
    while not run.done.all():
        run.advance()
    assert run.tokens == want
    with pytest.raises(ValueError, match="only speculative"):
        dec.start([p0], **kw).insert(0, p2)


def test_decode_memory_is_params_plus_cache():
    """Segments run over the one stacked copy of the layer weights: the compiled loop's
    temporaries stay far below the layer stack (a per-segment copy would be all of it), for
    every mode, and the program's arguments are exactly params + decode state."""
    cfg = MHA.replace(num_hidden_layers=8)
    params = random_params(cfg, 0)
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(params["layers"]))
    dec = decoder(params, cfg)
    for kw in (dict(mode="speculative", draft_layer=3), dict(mode="fixed", exit_layer=5),
               dict(mode="early-exit", exits=[2, 5, 8])):
        mem = dec.memory([[1, 2, 3]] * 2, max_new_tokens=MAX_NEW, max_len=MAX_LEN, **kw)
        assert mem.weight_copies == 0
        assert mem.params == sum(x.nbytes for x in jax.tree.leaves(params))
        assert mem.temp < 0.5 * layer_bytes, (kw, mem, layer_bytes)
        assert mem.peak < mem.params + mem.state + 0.5 * layer_bytes


def test_speculative_accept_math():
    """Rejection sampling on given distributions: the emitted token at the first position is
    distributed as p (whatever q is), and the accept count follows min(1, p/q)."""
    from sorted_jax.decoding import speculative_accept

    rng = np.random.default_rng(0)
    v, n_rows = 6, 40000
    p = rng.dirichlet(np.ones(v), size=3).astype(np.float32)  # target at positions 0..2
    q = rng.dirichlet(np.ones(v) * 0.5, size=2).astype(np.float32)  # draft at positions 0..1
    drafts = np.stack([rng.choice(v, n_rows, p=q[0] / q[0].sum()),
                       rng.choice(v, n_rows, p=q[1] / q[1].sum())], axis=1).astype(np.int32)
    pb = np.broadcast_to(p, (n_rows, 3, v))
    qb = np.broadcast_to(q, (n_rows, 2, v))
    a, tok = jax.jit(speculative_accept, compiler_options=FAST)(
        jax.random.PRNGKey(0), pb, qb, drafts, jnp.asarray(2))
    a, tok, drafts = np.asarray(a), np.asarray(tok), np.asarray(drafts)
    first = np.where(a >= 1, drafts[:, 0], tok)
    emp = np.bincount(first, minlength=v) / n_rows
    assert 0.5 * np.abs(emp - p[0]).sum() < 0.02
    accept_rate = np.minimum(p[0], q[0]).sum()  # P(first draft accepted)
    assert np.mean(a >= 1) == pytest.approx(accept_rate, abs=0.01)
    # given the first draft accepted, the second emitted token is distributed as p[1]
    sel = a >= 1
    second = np.where(a[sel] >= 2, drafts[sel, 1], tok[sel])
    emp2 = np.bincount(second, minlength=v) / sel.sum()
    assert 0.5 * np.abs(emp2 - p[1]).sum() < 0.03
    # all accepted: the bonus token is drawn from p[2]
    sel2 = a == 2
    emp3 = np.bincount(tok[sel2], minlength=v) / sel2.sum()
    assert 0.5 * np.abs(emp3 - p[2]).sum() < 0.05


SMALL_V = SMALL_VOCAB_4L


def test_speculative_sampling_matches_full_distribution():
    """End to end on a 16-token vocab: the 2nd and 3rd sampled tokens (made by draft +
    verify) follow the full model's marginals, computed exactly by enumerating prefixes.

    Batches of 2 rows over 1500 seeds, each row committing its own accepted drafts (per-row
    commit; the rows of a batch often keep different counts, asserted below), so the check
    is about committed drafts, not only the verifier's own samples."""
    params = random_params(SMALL_V, 11, scale=6.0)
    prompt = [1, 4, 7]
    dec = decoder(params, SMALL_V, max_draft=4, speculation="always")
    toks, committed, accepted, drafted, uneven = [], 0, 0, 0, 0
    for seed in range(1500):
        res = dec.generate([prompt] * 2, mode="speculative", draft_layer=1, temperature=1.0,
                           max_new_tokens=3, seed=seed, max_len=16, eos_id=[])
        toks += res.tokens
        committed += res.stats.committed_drafts
        accepted += res.stats.accepted
        drafted += res.stats.drafted
        uneven += len(set(res.stats.committed_per_row)) > 1
    toks = np.asarray(toks)
    rows = len(toks)
    assert toks.shape == (rows, 3) and rows == 3000
    assert 0 < accepted < drafted
    # tokens 2 and 3 of a row come from drafts often enough for the check to be about them
    assert committed > 0.2 * rows, (committed, rows)
    # per-row commit: the two rows of a batch often kept different numbers of drafts
    assert uneven > 0.1 * 1500, uneven
    # exact marginals by enumerating every 1- and 2-token continuation (one batched call)
    v = SMALL_V.vocab_size
    seqs = [prompt] + [prompt + [a] for a in range(v)] + [
        prompt + [a, b] for a in range(v) for b in range(v)]
    ids = np.zeros((len(seqs), _REF_T), np.int32)
    mask = np.zeros((len(seqs), _REF_T), bool)
    for i, q in enumerate(seqs):
        ids[i, :len(q)], mask[i, :len(q)] = q, True
    last = np.asarray([len(q) - 1 for q in seqs], np.int32)
    logits = np.asarray(_ref_fn(SMALL_V)(params, ids, mask, last)[-1], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    p1, p2, p3 = probs[0], probs[1:1 + v], probs[1 + v:].reshape(v, v, v)
    m2 = p1 @ p2
    m3 = np.einsum("a,ab,abc->c", p1, p2, p3)
    emp1 = np.bincount(toks[:, 0], minlength=v) / rows
    emp2 = np.bincount(toks[:, 1], minlength=v) / rows
    emp3 = np.bincount(toks[:, 2], minlength=v) / rows
    tvs = [0.5 * np.abs(e - m).sum() for e, m in ((emp1, p1), (emp2, m2), (emp3, m3))]
    assert max(tvs) < 0.05, tvs
    # the draft (exit 1) differs enough from the full model for this check to mean something
    q_logits = np.asarray(_ref_fn(SMALL_V)(params, ids, mask, last)[0, 0], np.float64)
    q1 = np.exp(q_logits - q_logits.max())
    q1 /= q1.sum()
    assert 0.5 * np.abs(q1 - p1).sum() > 0.1


# ---------------------------------------------------------------------------------------------
# Sampling filters


def test_warp_top_k_top_p():
    from sorted_jax.decoding import SamplingParams, probs_of

    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = np.asarray(probs_of(logits, SamplingParams.make(1.0, 0, 1.0)))[0]
    np.testing.assert_allclose(p, [0.5, 0.2, 0.15, 0.1, 0.05], rtol=1e-5)
    p = np.asarray(probs_of(logits, SamplingParams.make(1.0, 2, 1.0)))[0]
    np.testing.assert_allclose(p, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], rtol=1e-5, atol=1e-7)
    p = np.asarray(probs_of(logits, SamplingParams.make(1.0, 0, 0.8)))[0]  # 0.5+0.2 < 0.8
    np.testing.assert_allclose(p, np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85, rtol=1e-5, atol=1e-7)
    p = np.asarray(probs_of(logits, SamplingParams.make(1.0, 0, 0.01)))[0]
    np.testing.assert_allclose(p, [1, 0, 0, 0, 0], atol=1e-7)
    p = np.asarray(probs_of(logits, SamplingParams.make(1.0, 3, 0.6)))[0]  # top-k then top-p
    np.testing.assert_allclose(p, np.array([0.5, 0.2, 0, 0, 0]) / 0.7, rtol=1e-5, atol=1e-7)
    hot = np.asarray(probs_of(logits, SamplingParams.make(0.5, 0, 1.0)))[0]
    want = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    np.testing.assert_allclose(hot, want / want.sum(), rtol=1e-5)


def test_sampling_is_seeded(gqa, prompts3):
    dec = decoder(gqa, GQA)
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    a = dec.generate(prompts3, seed=1, **kw)
    b = dec.generate(prompts3, seed=1, **kw)
    c = dec.generate(prompts3, seed=2, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens


# ---------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="fixed", exit_layer=0), "exit_layer must be an integer in 1..4"),
    (dict(mode="fixed", exit_layer=5), "exit_layer must be an integer in 1..4"),
    (dict(mode="early-exit", exits=[2, 1, 4]), "strictly increasing"),
    (dict(mode="early-exit", exits=[1, 9]), "exit must be an integer in 1..4"),
    (dict(mode="early-exit", exits=[1, 2, 4], thresholds=[0.9]), "need 2 thresholds"),
    (dict(mode="speculative", draft_layer=4), "draft_layer must be an integer in 1..3"),
    (dict(mode="beam"), "mode must be one of"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(max_new_tokens=62), "exceeds the model's context of 64"),
    (dict(max_len=16, max_new_tokens=12), "KV cache holds 16 slots"),
])
def test_bad_arguments(gqa, kwargs, match):
    with pytest.raises(ValueError, match=match):
        decoder(gqa, GQA).generate([[1, 2, 3]], **kwargs)


def test_bad_prompts(gqa):
    dec = decoder(gqa, GQA)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        dec.generate([[1, 2], []])
    with pytest.raises(ValueError, match="no prompts"):
        dec.generate([])
    with pytest.raises(ValueError, match="outside"):
        dec.generate([[1, 500]])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        dec.generate([[1] * 70], max_new_tokens=1)
