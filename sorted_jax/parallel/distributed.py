"""Multi-process start-up: `jax.distributed.initialize` from a run's `distributed` config group.

It must run before anything touches devices (a mesh, `jax.devices()`, a jitted call), so the
training command calls it first. Disabled (the default) or already initialised: nothing happens.
`cpu_collectives` picks the CPU backend's collectives (gloo) for multi-process runs on CPUs.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections


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
