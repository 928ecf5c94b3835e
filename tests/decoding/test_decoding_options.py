"""Decoding requests and results as values: `DecodeOptions` (frozen, hashable, checked when
made), its `Route`, `Programs` equality, typed statistics and their merge. Nothing compiles."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest
from helpers import GQA_4L

from sorted_jax.core.errors import DecodeError
from sorted_jax.decoding import (
    DecodeOptions,
    EarlyExitStats,
    FixedStats,
    Programs,
    SpeculativeStats,
)


def test_options_are_frozen_hashable_values():
    a = DecodeOptions(mode="early-exit", exits=[2, 4], thresholds=[0.9])
    assert a.exits == (2, 4) and a.thresholds == (0.9,)  # lists become tuples
    assert a == DecodeOptions(mode="early-exit", exits=(2, 4), thresholds=(0.9,))
    assert len({a, a.replace(), DecodeOptions()}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.mode = "fixed"  # type: ignore[misc]
    b = a.replace(max_new_tokens=7, eos_id=[2, 3])
    assert b.max_new_tokens == 7 and b.eos_id == (2, 3) and a.max_new_tokens == 32
    assert b.eos_ids(GQA_4L) == [2, 3] and a.eos_ids(GQA_4L) == [2]
    assert DecodeOptions(eos_id=()).eos_ids(GQA_4L) == []
    assert DecodeOptions().greedy and not DecodeOptions(temperature=0.5).greedy


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="beam"), "mode must be one of"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_k=-2), "top_k must be >= 0"),
])
def test_options_are_checked_when_made(kwargs, match):
    with pytest.raises(DecodeError, match=match):
        DecodeOptions(**kwargs)


def test_routes():
    assert DecodeOptions().route(GQA_4L).bounds == ((0, 4),)
    p = DecodeOptions(mode="early-exit", exits=(1, 2, 4), thresholds=(0.5, 0.6, 0.7)).route(
        GQA_4L)
    assert (p.kind, p.bounds, p.thresholds) == ("ladder", ((0, 1), (1, 2), (2, 4)), (0.5, 0.6))
    p = DecodeOptions(mode="speculative").route(GQA_4L)
    assert (p.kind, p.bounds) == ("speculative", ((0, 1), (1, 4)))  # the first default exit
    with pytest.raises(DecodeError, match="thresholds must be numbers"):
        DecodeOptions(mode="early-exit", exits=(1, 4), thresholds=(float("nan"),)).route(GQA_4L)


def test_programs_compare_by_what_they_compile():
    route = DecodeOptions(exit_layer=2).route(GQA_4L)
    kw = dict(greedy=True, dtype=jnp.float32, cache_dtype=jnp.float32, attention_impl="xla",
              max_draft=8, ee_chunk=8)
    a = Programs.make(GQA_4L, route, **kw)
    # a single segment ignores the early-exit chunk and the draft window: the same program
    assert a == Programs.make(GQA_4L, route, **{**kw, "ee_chunk": 2, "max_draft": 3})
    assert hash(a) == hash(Programs.make(GQA_4L.replace(), route, **kw))
    assert a != Programs.make(GQA_4L, route, **{**kw, "greedy": False})
    assert a != Programs.make(GQA_4L.replace(rope_theta=500000.0), route, **kw)
    assert a != Programs.make(GQA_4L, route, **kw, compiler_options=(("x", 1),))


def test_typed_stats_merge_and_read_like_the_old_dicts():
    f = FixedStats("fixed", 3, 0.5, layers=2)
    assert f.merge(FixedStats("fixed", 4, 0.1, layers=2)).tokens == 7
    assert f["layers"] == 2 and f["tokens"] == 3
    with pytest.raises(KeyError):
        f["acceptance_rate"]
    e = EarlyExitStats("early-exit", 3, 0.1, avg_exit_layer=2.0, exit_histogram={1: 1, 3: 1},
                       thresholds=(0.9,))
    m = e.merge(EarlyExitStats("early-exit", 2, 0.1, avg_exit_layer=3.0,
                               exit_histogram={1: 0, 3: 2}, thresholds=(0.9,)))
    assert m.exit_histogram == {1: 1, 3: 3} and m.avg_exit_layer == pytest.approx(10 / 4)
    assert m.tokens == 5
    s = SpeculativeStats("speculative", 10, 0.1, draft_layer=1, drafted=8, accepted=4,
                         acceptance_rate=0.5, committed_drafts=3, full_passes=4, draft_passes=9,
                         tokens_per_full_pass=2.5)
    t = s.merge(dataclasses.replace(s, drafted=2, accepted=2))
    assert (t.drafted, t.accepted, t.acceptance_rate, t.full_passes) == (10, 6, 0.6, 8)
    assert s["acceptance_rate"] == 0.5
