"""What decoding returns: the generated ids and typed statistics, one type per kind of run.

    res = decoder.generate(prompts, mode="speculative")
    res.tokens                  # list of id lists, EOS included when a row stopped on it
    res.stats.acceptance_rate   # SpeculativeStats

`FixedStats` (one depth), `EarlyExitStats` (several exits), `SpeculativeStats` share
`DecodeStats`' fields; `merge` adds up the counts of two runs of the same kind (e.g. batches of
one command). `stats["name"]` still reads a field, for callers written against the old dicts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class DecodeStats:
    """`mode`, `tokens` (generated, all rows), `seconds` (wall time incl. any compilation)."""

    mode: str
    tokens: int
    seconds: float

    def __getitem__(self, name: str) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def merge(self, other: DecodeStats) -> DecodeStats:
        return dataclasses.replace(self, tokens=self.tokens + other.tokens)


@dataclasses.dataclass(frozen=True)
class FixedStats(DecodeStats):
    """One segment: every token ran the first `layers` layers."""

    layers: int


@dataclasses.dataclass(frozen=True)
class EarlyExitStats(DecodeStats):
    """Tokens per exit layer (`exit_histogram`), their mean (`avg_exit_layer`), and the
    thresholds of all exits but the last. How the batch's steps ran: `ladder_steps` segment
    after segment (deeper ones only while a row needs them), `one_loop_steps` every segment
    in one loop then the checks (when the ladder would skip few layers), `unchecked_steps`
    one loop and no checks (the batch check schedule, `ee_min_saving`)."""

    avg_exit_layer: float
    exit_histogram: Mapping[int, int]
    thresholds: tuple[float, ...]
    ladder_steps: int = 0
    one_loop_steps: int = 0
    unchecked_steps: int = 0

    def merge(self, other: DecodeStats) -> EarlyExitStats:
        assert isinstance(other, EarlyExitStats), other
        hist = {k: self.exit_histogram.get(k, 0) + v for k, v in other.exit_histogram.items()}
        n = max(sum(hist.values()), 1)
        return dataclasses.replace(
            self, tokens=self.tokens + other.tokens, exit_histogram=hist,
            avg_exit_layer=sum(k * v for k, v in hist.items()) / n,
            ladder_steps=self.ladder_steps + other.ladder_steps,
            one_loop_steps=self.one_loop_steps + other.one_loop_steps,
            unchecked_steps=self.unchecked_steps + other.unchecked_steps)


@dataclasses.dataclass(frozen=True)
class SpeculativeStats(DecodeStats):
    """`acceptance_rate` = accepted / drafted (per row, before any lockstep cut);
    `full_passes` = verify rounds of the batch + the prefill; `committed_drafts` = drafts
    kept; `committed_per_row` / `rounds_per_row`: drafts kept and verify rounds of each row
    (per-row commit lets rows of a batch keep different counts); `tokens_per_full_pass`:
    tokens over the rows' own full-model passes (their verify rounds + the prefill);
    `plain_rounds`: rounds that drafted nothing (dynamic speculation's plain steps)."""

    draft_layer: int
    drafted: int
    accepted: int
    acceptance_rate: float
    committed_drafts: int
    full_passes: int
    draft_passes: int
    tokens_per_full_pass: float
    committed_per_row: tuple[int, ...] = ()
    rounds_per_row: tuple[int, ...] = ()
    plain_rounds: int = 0

    def merge(self, other: DecodeStats) -> SpeculativeStats:
        assert isinstance(other, SpeculativeStats), other
        summed = {k: getattr(self, k) + getattr(other, k) for k in (
            "tokens", "drafted", "accepted", "full_passes", "committed_drafts", "draft_passes",
            "plain_rounds")}
        rate = summed["accepted"] / summed["drafted"] if summed["drafted"] else 0.0
        return dataclasses.replace(
            self, acceptance_rate=rate, **summed,
            committed_per_row=self.committed_per_row + other.committed_per_row,
            rounds_per_row=self.rounds_per_row + other.rounds_per_row)


@dataclasses.dataclass(frozen=True)
class DecodeMemory:
    """Device bytes of one compiled decode loop (XLA's `memory_analysis`, deterministic):
    `params` (the weights it reads), `state` (KV caches, buffers, outputs), `temp` (XLA's
    temporaries), `weight_copies` (layer weights the decoder holds beyond `params`: 0 since
    segments run over the one stacked copy). `peak` = arguments + temporaries (the state is
    donated, so outputs reuse its buffers)."""

    params: int
    state: int
    temp: int
    weight_copies: int

    @property
    def peak(self) -> int:
        return self.params + self.weight_copies + self.state + self.temp


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Generated ids per row (EOS included when a row stopped on it) and the run's stats."""

    tokens: list[list[int]]
    stats: DecodeStats
