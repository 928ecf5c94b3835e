"""Memory planner: per-device bytes of a training setup, without allocating the model.

Parameters and optimizer state are counted from `jax.eval_shape` of the init and the shardings
the rules table gives them; gradients and activations come from XLA's compiled memory analysis
of the real train step on abstract inputs. On a CPU host, planning for N accelerators needs N
(fake) devices: `plan_in_subprocess` starts a Python with
`--xla_force_host_platform_device_count=N`. CPU compilation approximates GPU/TPU temporaries
(fusion decisions differ), so treat the figure as a plan, not a promise.

Two things XLA:CPU compiles differently from a GPU would hide the answer for a GPU run, so a plan
made on a CPU for one (`gpu_estimate`) compiles the step a second time without them and reports
both figures: (1) attention: XLA's attention materialises the `[B, H, T, T]` scores (2 GiB per
buffer for 4 x 2048 tokens and 32 heads, several live in the backward pass) where cuDNN's flash
attention keeps `[B, H, T]` statistics, so the second compile swaps in a stand-in with the same
inputs and output and no `[T, T]` array (`flash_attention_standin`); (2) a frozen bf16 / fp32
LoRA base: XLA:CPU has no bf16 dot, and the f32 convert it adds is hoisted out of the layer scan
onto the whole stack (a phantom fp32 copy of the base), so the second compile holds the base as
int8 codes dequantised per layer (the real per-layer slices are smaller still). One more
XLA:CPU artefact is measured, not removed: it updates and reads the scan's saved bf16 layer
inputs `[L, B, T, D]` through f32 copies of the whole stack; `cpu_upcast_bytes` sums the f32
converts of bf16 `[L, ...]` stacks in the compiled program, and the GPU estimate subtracts them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sorted_jax.tools import hlo_stats

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
    # What XLA:CPU compiled, when `compiled_temp_bytes` is the GPU estimate (module docstring),
    # and the f32 copies of bf16 layer stacks it makes that the estimate leaves out.
    cpu_temp_bytes: float | None = None
    cpu_upcast_bytes: float = 0.0

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
            ("step temporaries (grads, activations) / device" if self.cpu_temp_bytes is None
             else "step temporaries on a GPU (flash attention) / device",
             f"{self.compiled_temp_bytes / GiB:.2f} GiB"),
            *([("  as XLA:CPU compiles them (XLA attention)",
                f"{self.cpu_temp_bytes / GiB:.2f} GiB"),
               ("  XLA:CPU's f32 copies of bf16 layer stacks (left out)",
                f"{self.cpu_upcast_bytes / GiB:.2f} GiB")]
              if self.cpu_temp_bytes is not None else []),
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


@contextlib.contextmanager
def flash_attention_standin() -> Iterator[None]:
    """While lowering: `jax.nn.dot_product_attention` replaced by an elementwise stand-in with
    its inputs and output and no `[B, H, T, S]` array, for the memory of flash attention."""
    real = jax.nn.dot_product_attention

    def standin(query, key, value, *args, **kwargs):
        rep = query.shape[2] // key.shape[2]
        k, v = (jnp.repeat(x, rep, axis=2) for x in (key, value))
        return (query * k + v).astype(query.dtype)

    jax.nn.dot_product_attention = standin
    try:
        yield
    finally:
        jax.nn.dot_product_attention = real


def upcast_stack_bytes(hlo_text: str, num_layers: int) -> float:
    """Bytes of the distinct f32 arrays `[L, ...]` made by converting a bf16 one of the same
    shape (XLA:CPU's upcasts of stacked layer buffers; a GPU computes on them in bf16)."""
    program = hlo_stats.Program.parse(hlo_text)
    shapes = set()
    for comp, insts in program.computations.items():
        for inst in insts:
            if inst.opcode != "convert" or not inst.operands:
                continue
            out = inst.shapes
            src = program.shape_of(comp, inst.operands[0].lstrip("%"))
            if (len(out) == 1 and out[0][0] == "f32" and len(out[0][1]) > 1
                    and out[0][1][0] == num_layers and src is not None
                    and src.startswith("bf16[") and hlo_stats.parse_shape(src)[1] == out[0][1]):
                shapes.add(out[0][1])
    return float(sum(4 * math.prod(s) for s in shapes))


def plan_steps(steps: Any, batch_shape: tuple[int, int],
               device_memory_gib: float | None = None, gpu_estimate: Any = None
               ) -> MemoryPlan:
    """Plan for a built `train_step.SoftSteps` (its mesh, rules, remat, exits) and a batch.

    `gpu_estimate`: the same step built for the GPU estimate (module docstring), a separate
    `SoftSteps` (its own jit, traced under the attention stand-in)."""
    abstract, shardings = steps.abstract_state, steps.state_shardings
    params = _sharded_bytes(abstract.params, shardings.params)
    opt = _sharded_bytes(abstract.opt_state, shardings.opt_state)
    teacher = 0.0 if steps.teacher is None else _sharded_bytes(
        steps.abstract_teacher, steps.teacher_shardings)
    frozen = 0.0 if steps.abstract_frozen is None else _sharded_bytes(
        steps.abstract_frozen, steps.frozen_shardings)
    mem = steps.lower_train_step(batch_shape).compile().memory_analysis()
    temp, cpu_temp = float(mem.temp_size_in_bytes), None
    upcast = 0.0
    if gpu_estimate is not None:
        with flash_attention_standin():
            lowered = gpu_estimate.lower_train_step(batch_shape)
        compiled = lowered.compile()
        upcast = upcast_stack_bytes(compiled.as_text(), steps.model.config.num_hidden_layers)
        temp, cpu_temp = float(compiled.memory_analysis().temp_size_in_bytes) - upcast, temp
    return MemoryPlan(
        devices=steps.mesh.devices.size, mesh=dict(steps.mesh.shape),
        params_bytes=params, opt_state_bytes=opt, teacher_bytes=teacher, frozen_bytes=frozen,
        compiled_argument_bytes=float(mem.argument_size_in_bytes),
        compiled_temp_bytes=temp, cpu_temp_bytes=cpu_temp, cpu_upcast_bytes=upcast,
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
