"""Memory planner: per-device bytes of a training setup, without allocating the model.

Parameters and optimizer state are counted from `jax.eval_shape` of the init and the shardings
the rules table gives them; gradients and activations come from XLA's compiled memory analysis
of the real train step on abstract inputs. On a CPU host, planning for N accelerators needs N
(fake) devices: `plan_in_subprocess` starts a Python with
`--xla_force_host_platform_device_count=N`. CPU compilation approximates GPU/TPU temporaries
(fusion decisions differ), so treat the figure as a plan, not a promise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax

GiB = 2**30

DEVICE_MEMORY_GIB = {
    "h100": 80.0, "h200": 141.0, "a100-40": 40.0, "a100-80": 80.0, "l4": 24.0,
    "v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0,
}


@dataclasses.dataclass
class MemoryPlan:
    devices: int
    mesh: dict[str, int]
    params_bytes: float  # per device
    opt_state_bytes: float  # per device
    compiled_argument_bytes: float  # per device: state + batch, as XLA lays them out
    compiled_temp_bytes: float  # per device: gradients, activations, loss chunks
    compiled_output_bytes: float
    device_memory_bytes: float | None = None
    teacher_bytes: float = 0.0  # per device: an anchored run's frozen teacher (in the arguments)
    frozen_bytes: float = 0.0  # per device: a LoRA run's frozen base (in the arguments)

    @property
    def total_bytes(self) -> float:
        # Donated state: outputs alias the arguments, so count arguments + temporaries.
        return self.compiled_argument_bytes + self.compiled_temp_bytes

    @property
    def fits(self) -> bool | None:
        if self.device_memory_bytes is None:
            return None
        return self.total_bytes <= 0.9 * self.device_memory_bytes  # leave runtime headroom

    def table(self) -> str:
        rows = [
            ("mesh", ", ".join(f"{k}={v}" for k, v in self.mesh.items())),
            ("params / device", f"{self.params_bytes / GiB:.2f} GiB"),
            ("optimizer state / device", f"{self.opt_state_bytes / GiB:.2f} GiB"),
            *([("frozen teacher / device", f"{self.teacher_bytes / GiB:.2f} GiB")]
              if self.teacher_bytes else []),
            *([("frozen base / device", f"{self.frozen_bytes / GiB:.2f} GiB")]
              if self.frozen_bytes else []),
            ("step arguments (state + batch) / device",
             f"{self.compiled_argument_bytes / GiB:.2f} GiB"),
            ("step temporaries (grads, activations) / device",
             f"{self.compiled_temp_bytes / GiB:.2f} GiB"),
            ("total / device", f"{self.total_bytes / GiB:.2f} GiB"),
        ]
        if self.device_memory_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            rows.append(("device memory", f"{self.device_memory_bytes / GiB:.1f} GiB: {verdict} "
                                          "(90% usable)"))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits)
        return d


def _sharded_bytes(abstract: Any, shardings: Any) -> float:
    """Bytes per device of a tree of abstract arrays under their shardings."""
    total = 0.0
    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for leaf, sh in zip(leaves, jax.tree.leaves(shardings), strict=True):
        value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
        shard = sh.shard_shape(value.shape)
        total += math.prod(shard) * value.dtype.itemsize
    return total


def plan_steps(steps: Any, batch_shape: tuple[int, int],
               device_memory_gib: float | None = None) -> MemoryPlan:
    """Plan for a built `train_step.SoftSteps` (its mesh, rules, remat, exits) and a batch."""
    abstract, shardings = steps.abstract_state, steps.state_shardings
    params = _sharded_bytes(abstract.params, shardings.params)
    opt = _sharded_bytes(abstract.opt_state, shardings.opt_state)
    teacher = 0.0 if steps.teacher is None else _sharded_bytes(
        steps.abstract_teacher, steps.teacher_shardings)
    frozen = 0.0 if steps.abstract_frozen is None else _sharded_bytes(
        steps.abstract_frozen, steps.frozen_shardings)
    mem = steps.lower_train_step(batch_shape).compile().memory_analysis()
    return MemoryPlan(
        devices=steps.mesh.devices.size, mesh=dict(steps.mesh.shape),
        params_bytes=params, opt_state_bytes=opt, teacher_bytes=teacher, frozen_bytes=frozen,
        compiled_argument_bytes=float(mem.argument_size_in_bytes),
        compiled_temp_bytes=float(mem.temp_size_in_bytes),
        compiled_output_bytes=float(mem.output_size_in_bytes),
        device_memory_bytes=None if device_memory_gib is None else device_memory_gib * GiB)


def suggestions(plan: MemoryPlan, remat_policy: str, mu_dtype: str = "") -> list[str]:
    """What to change when a plan does not fit, most effective first."""
    if plan.fits is not False:
        return []
    out = []
    state = plan.params_bytes + plan.opt_state_bytes
    if plan.mesh.get("fsdp", 1) < plan.devices and state > 0.3 * plan.compiled_argument_bytes:
        out.append(f"shard params and optimizer state over all devices: "
                   f"--config.mesh.shape=1,-1,1 (fsdp={plan.devices}); state is "
                   f"{state / GiB:.1f} GiB/device now")
    if remat_policy in ("none", "dots_saveable", "save_qkv_and_out_proj"):
        out.append("recompute activations: --config.remat_policy=full (or "
                   "dots_with_no_batch_dims_saveable)")
    out.append("split the batch: raise --config.grad_accum (same effective batch, fewer "
               "activations live at once)")
    # Not param_dtype=bfloat16: bf16 weights alone lose small updates (lr 2e-5 rounds away), so
    # training keeps an fp32 master copy beside them (train_step.with_fp32_master), which
    # costs 2 bytes per parameter more than fp32 params, not less.
    if mu_dtype not in ("bfloat16", "bf16"):
        out.append("Adam's first moment in bf16: --config.optim.mu_dtype=bfloat16 (saves 2 "
                   "bytes per parameter; the second moment and the master weights stay fp32)")
    out.append("more devices: a larger slice / more hosts")
    return out


def plan_in_subprocess(argv: list[str], num_devices: int, timeout: float | None = None
                       ) -> dict[str, Any]:
    """Run `python -m sorted_jax.train ... --plan_json` with N fake CPU devices; parse its JSON.

    Used when planning for more accelerators than this host has.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={num_devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-m", "sorted_jax.train", *argv], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"planning subprocess failed:\n{out.stderr[-4000:]}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])
