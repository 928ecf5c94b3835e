"""The optimizer of a train step: AdamW with warmup + decay and clipping, and fp32 master
weights for low-precision params (`with_fp32_master`). `train_step` re-exports all three."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def make_optimizer(*, lr: float, total_steps: int, warmup_steps: int = 0,
                   schedule: str = "cosine", end_lr_ratio: float = 0.0,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, clip_norm: float | None = 1.0,
                   mu_dtype: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup then cosine (or constant/linear) decay, global-norm clipping."""
    if lr <= 0 or total_steps <= 0:
        raise ValueError(f"need lr > 0 and total_steps > 0, got lr={lr}, steps={total_steps}")
    warmup_steps = min(max(0, int(warmup_steps)), total_steps)
    decay_steps = max(1, total_steps - warmup_steps)
    end = lr * end_lr_ratio
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr_ratio)
    elif schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}: use cosine, linear or constant")
    sched = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps]
    ) if warmup_steps else decay
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mu_dtype=mu_dtype))
    return optax.chain(*parts), sched


class MasterWeightsState(NamedTuple):
    """fp32 copy of low-precision params, and the wrapped optimizer's state (over the copy)."""

    master: Any
    inner: Any


def with_fp32_master(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run `tx` on an fp32 master copy of (bf16 / fp16) params, kept in the optimizer state.

    A bf16 weight only changes when an update exceeds half its ulp (2^-9 of its magnitude): at
    lr 2e-5 most of Adam's updates round away, and RMSNorm scales (~1.0) never move. The master
    copy accumulates every update; the params are its cast (`SoftSteps` sets them to exactly
    `master.astype(param dtype)` after each step). Costs 4 bytes per parameter on top of the
    low-precision params, and the moments are fp32 unless `mu_dtype` says otherwise: bf16
    params with a master copy never use less memory than fp32 params, they only halve what
    FSDP gathers.
    """
    def init(params: Any) -> MasterWeightsState:
        master = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        return MasterWeightsState(master, tx.init(master))

    def update(grads: Any, state: MasterWeightsState, params: Any = None
               ) -> tuple[Any, MasterWeightsState]:
        g32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, inner = tx.update(g32, state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        if params is None:
            return updates, MasterWeightsState(master, inner)
        cast = jax.tree.map(lambda m, p: m.astype(p.dtype), master, params)
        return jax.tree.map(lambda c, p: c - p, cast, params), MasterWeightsState(master, inner)

    return optax.GradientTransformation(init, update)


def low_precision(dtype: Any) -> bool:
    return jnp.dtype(dtype).itemsize < 4
