"""Multi-process start-up: `jax.distributed.initialize` from a run's `distributed` config group.

It must run before anything touches devices (a mesh, `jax.devices()`, a jitted call), so the
training command calls it first. Disabled (the default) or already initialised: nothing happens.
`cpu_collectives` picks the CPU backend's collectives (gloo) for multi-process runs on CPUs.
`on_every_process` runs a step that may refuse (a `UserError`) on every process and stops them
all when one refuses, instead of leaving the others waiting in the next collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sorted_jax.core.errors import UserError

T = TypeVar("T")


def init_distributed(d: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize` with the fields of `d` that are set (the rest auto-detected,
    e.g. from the TPU or SLURM environment)."""
    if not d.enabled or jax.distributed.is_initialized():
        return
    if d.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    kwargs: dict[str, Any] = {"initialization_timeout": int(d.initialization_timeout)}
    if d.coordinator_address:
        kwargs["coordinator_address"] = d.coordinator_address
    if d.num_processes > 0:
        kwargs["num_processes"] = int(d.num_processes)
    if d.process_id >= 0:
        kwargs["process_id"] = int(d.process_id)
    jax.distributed.initialize(**kwargs)


def on_every_process(fn: Callable[[], T], undo: Callable[[T], Any] | None = None) -> T:
    """`fn()`, called by every process of the run at the same point (a collective follows).

    If it raises a `UserError` on some process, every process stops: that one with its own
    error, the others (after `undo` of their result, e.g. releasing a lock) with one naming the
    processes that refused, instead of waiting for them in the next collective. Any other
    exception propagates at once (a bug)."""
    error: UserError | None = None
    try:
        out = fn()
    except UserError as e:
        error = e
    failed = [0] if error is not None else []
    if jax.process_count() > 1:
        flags = np.ravel(multihost_utils.process_allgather(np.int32(error is None)))
        failed = [i for i, x in enumerate(flags) if not x]
    if error is not None:
        raise error
    if failed:
        if undo is not None:
            undo(out)
        raise UserError(f"process(es) {failed} of this run refused to start (their message says "
                        "why, e.g. process 0's); this one stops too")
    return out
