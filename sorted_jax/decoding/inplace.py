"""Branches that update the decode state in place.

A decode step branches on traced values (does any row draft? which verify width? does a
deeper early-exit segment run?), and every branch writes into KV caches that live in the
decode loop's carry. Under `lax.cond` / `lax.switch`, XLA:CPU copied each cache that went
through the branch, in and out, every step: on the tiny SoFT model at batch 16 a plain round
of the speculative program cost 1.47x the full model's step, almost all of it those copies.
A while loop updates its carry in place, so `run_if` is a branch written as a loop of 0 or 1
trips (docs/benchmarks.md, "Decoding without copies").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp

T = TypeVar("T")


def run_if(pred: jax.Array, fn: Callable[[T], T], x: T) -> T:
    """`fn(x)` where `pred` (a traced bool) holds, else `x`; `fn` keeps `x`'s structure."""
    return jax.lax.while_loop(lambda c: c[0], lambda c: (jnp.zeros((), bool), fn(c[1])),
                              (pred, x))[1]


def run_case(index: jax.Array, branches: Sequence[Callable[[T], T]], x: T) -> T:
    """`branches[index](x)` (`lax.switch` without the copies): one `run_if` per branch, of
    which exactly the indexed one runs."""
    for i, fn in enumerate(branches):
        x = run_if(index == i, fn, x)
    return x
