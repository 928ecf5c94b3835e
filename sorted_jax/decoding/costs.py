"""What a speculative round costs, relative to a plain full-model step: measured once per
decoder and batch shape, or given (deterministic runs, tests).

    costs = SpecCosts(draft=0.3, verify={1: 1.0, 2: 1.2, 4: 1.5, 9: 2.4})
    dec = Decoder(params, config, spec_costs=costs)      # else measured at first use

`measure` times rounds of the compiled program the caller runs (`loop` or `step`) from a real
prefilled state, with the number of drafts forced (`Control.force_drafts`): n = 0 (a plain
step, width 1), n = w - 1 for every compiled width w, and one more draft count at the widest
width, whose difference gives one draft pass. Through `loop` each timing runs up to
`LOOP_TOKENS` tokens (as many rounds as the forced drafts and the acceptance make, counted by
the program) less a call that runs none: one round of a small model is shorter than a call's
own jitter, which made single-round timings overstate wide verify passes about 1.5x at batch 1.
Each repeat times every count back to back and gives one estimate of the costs; the median
over repeats is kept, so a busy machine's bursts move single estimates, not the result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax.core.errors import DecodeError
from sorted_jax.decoding.speculative import width_index

REPEATS = 7  # back-to-back timings of every draft count; the median estimate is kept
LOOP_TOKENS = 36  # tokens per timing through `loop` (at most the request's max_new_tokens)


@dataclasses.dataclass(frozen=True)
class SpecCosts:
    """`draft`: one draft pass (layers [0, k) + the draft's head, one token); `verify`: the
    verify pass at each width w (layers [0, k) for one token, then [k, L) and the head for w
    tokens); all relative to a plain full-model step (verify at width 1)."""

    draft: float
    verify: Mapping[int, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "verify", {int(w): float(c) for w, c in self.verify.items()})
        costs = [self.draft, *self.verify.values()]
        if not all(np.isfinite(c) and c > 0 for c in costs):
            raise DecodeError(f"speculative costs must be positive numbers, got {self}")

    def at(self, widths: tuple[int, ...]) -> tuple[float, np.ndarray]:
        """(draft cost, verify costs at `widths`), every width required."""
        missing = [w for w in widths if w not in self.verify]
        if missing:
            raise DecodeError(f"spec_costs gives no verify cost for width(s) {missing}; this "
                              f"decoder verifies at widths {list(widths)}")
        return self.draft, np.asarray([self.verify[w] for w in widths], np.float32)

    @classmethod
    def layer_count(cls, draft_layer: int, num_layers: int, widths: tuple[int, ...]
                    ) -> SpecCosts:
        """The compute-bound model: a pass costs its layer-tokens (heads ignored)."""
        k, big_l = draft_layer, num_layers
        return cls(k / big_l, {w: (k + (big_l - k) * w) / big_l for w in widths})


def measure(progs: Any, params: dict, st: Any, ctl: Any, run: Callable, *,
            per_call: bool) -> SpecCosts:
    """Costs of `progs`' rounds at the shape of the prefilled state `st` (kept: each timed
    run starts from a copy), timed through `run(params, state, ctl)` (`progs.loop` or
    `progs.step`). `per_call`: the caller pays one call per round (`step`, streaming), so a
    call is one round and its fixed cost belongs to every round; else (`loop`) a call runs up
    to `LOOP_TOKENS` tokens, and a call that runs no round is timed and taken off."""
    widths, wd = progs.widths, progs.max_draft
    counts = {0, *(w - 1 for w in widths if w > 1)}
    # two draft counts in the widest width, as far apart as it allows: one draft pass is
    # their time difference over their count difference
    lo, hi = (widths[-2] if len(widths) > 1 else 1), widths[-1] - 1
    pair = hi > lo >= 1 and width_index(widths, wd)[lo] == len(widths) - 1
    counts = sorted(counts | ({lo} if pair else set()))
    tokens = 2 if per_call else max(2, min(int(ctl.max_new), LOOP_TOKENS))
    base = ctl.replace(max_new=jnp.asarray(tokens, jnp.int32))
    idle = jax.tree.map(lambda x: x.copy(), st).replace(done=st.done | True)

    def once(n: int | None) -> tuple[float, int]:
        """(seconds, rounds) of one call."""
        copy = jax.tree.map(lambda x: x.copy(), idle if n is None else st)
        ctl_n = base.replace(force_drafts=jnp.asarray(0 if n is None else n, jnp.int32))
        jax.block_until_ready((copy, ctl_n))
        t0 = time.perf_counter()
        out = jax.block_until_ready(run(params, copy, ctl_n))
        dt = time.perf_counter() - t0
        return dt, 1 if per_call else int(out.stats.rounds - st.stats.rounds)

    timed = [*counts] if per_call else [None, *counts]
    for n in timed:  # compile / warm up
        once(n)
    # one estimate per repeat from back-to-back timings (they share the machine's load), the
    # median over repeats of each cost
    estimates = [_costs(progs, {n: once(n) for n in timed}, per_call, pair, lo, hi)
                 for _ in range(REPEATS)]
    return SpecCosts(float(np.median([e[0] for e in estimates])),
                     {w: float(np.median([e[1][w] for e in estimates])) for w in widths})


def _costs(progs: Any, times: dict, per_call: bool, pair: bool, lo: int, hi: int
           ) -> tuple[float, dict[int, float]]:
    """(draft, verify by width) relative to a plain step, from one set of (seconds, rounds)
    timings."""
    fixed = 0.0 if per_call else times.pop(None)[0]
    t = {n: max(v - fixed, 1e-9) / max(rounds, 1) for n, (v, rounds) in times.items()}
    plain = t[0]
    if pair:
        draft = (t[hi] - t[lo]) / (hi - lo)
    else:  # no two draft counts share a width: split by layers
        k, big_l = progs.bounds[0][1], progs.bounds[-1][1]
        draft = plain * k / big_l
    draft = max(draft, 0.02 * plain)
    verify, floor = {}, plain
    for w in progs.widths:
        c = plain if w == 1 else t[w - 1] - (w - 1) * draft
        floor = max(floor, c)  # a wider pass never costs less than a narrower one
        verify[w] = floor / plain
    return draft / plain, verify
