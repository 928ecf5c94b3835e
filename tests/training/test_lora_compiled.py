"""The compiled LoRA step on 8 fake devices computes nothing the size of the base's gradient:
no dot yields a weight-sized array (no dW, and x @ A @ B is never regrouped as x @ (A @ B)),
no stacked weight-shaped float buffer exists (no gradient, moment, master or dequantised stack),
the arguments are the frozen base + the adapters' state + the batch, and the temporaries are
smaller than the full step's by more than the base's fp32 gradients."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from sorted_jax.model import lora, modeling
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.lora import LoraSpec
from sorted_jax.parallel import sharding
from sorted_jax.tools import hlo_stats
from sorted_jax.tools.memory_planner import _sharded_bytes
from sorted_jax.training import train_step

# Weights dominate: width 512, MLP 2048, and 8 x 8 tokens (one row of 8 per device).
CFG = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4)
BATCH = (8, 8)
FSDP = 8


def compiled(spec, dtype):
    if len(jax.devices()) < FSDP:
        pytest.skip("needs 8 fake CPU devices (conftest sets XLA_FLAGS)")
    mesh = sharding.make_mesh((1, FSDP, 1), jax.devices()[:FSDP])
    tx, _ = train_step.make_optimizer(lr=1e-4, total_steps=10)
    model = modeling.make_model(CFG, dtype=dtype, lora=spec,
                                param_dtype=jnp.float32 if spec is None else spec.float_dtype)
    steps = train_step.SoftSteps(model, exits=(2, 4), tx=tx, mesh=mesh, rows_per_chunk=64)
    return steps, steps.lower_train_step(BATCH).compile()


def kernel_sizes() -> set[int]:
    """Element counts of one layer's kernels, whole (gathered) and as one device's shard."""
    d, f = CFG.hidden_size, CFG.intermediate_size
    whole = {d * CFG.num_attention_heads * CFG.dim_per_head, d * f}
    return whole | {n // FSDP for n in whole}


def stacked_kernel_shapes() -> set[tuple[int, ...]]:
    """Shapes of the stacked [L, ...] kernels, whole and sharded over fsdp on `embed`."""
    big_l, d, f = CFG.num_hidden_layers, CFG.hidden_size, CFG.intermediate_size
    h, dh = CFG.num_attention_heads, CFG.dim_per_head
    out = set()
    for shard in (1, FSDP):
        out |= {(big_l, d // shard, h, dh), (big_l, h, dh, d // shard),
                (big_l, d // shard, f), (big_l, f, d // shard),
                (big_l, d // shard, h * dh), (big_l, h * dh, d // shard)}
    return out


def instructions(compiled_step):
    program = hlo_stats.Program.parse(compiled_step.as_text())
    return [i for insts in program.computations.values() for i in insts]


def weight_sized_dots(compiled_step) -> list[str]:
    sizes = kernel_sizes()
    return [f"{i.name}: {i.type}" for i in instructions(compiled_step)
            if i.opcode in ("dot", "convolution")
            and any(math.prod(dims) in sizes for _, dims in i.shapes)]


def stacked_float_buffers(compiled_step) -> list[str]:
    shapes = stacked_kernel_shapes()
    return [f"{i.name}: {i.type}" for i in instructions(compiled_step)
            if any(dt in ("f32", "bf16", "f16") and dims in shapes for dt, dims in i.shapes)]


def state_bytes(tree, shardings) -> float:
    return _sharded_bytes(tree, shardings)


def test_the_compiled_lora_step_computes_nothing_the_size_of_a_base_gradient():
    full_steps, full = compiled(None, jnp.float32)
    f32_steps, lora_f32 = compiled(LoraSpec(rank=8, base_dtype="float32"), jnp.float32)
    nf4_steps, lora_nf4 = compiled(LoraSpec(rank=8, base_dtype="nf4"), jnp.bfloat16)

    # The full step's dW dots and gradient stacks are there: the checks below can fail.
    assert weight_sized_dots(full) and stacked_float_buffers(full)
    # No dot yields a weight-sized array in either LoRA step: no dW, and no x @ (A @ B).
    assert weight_sized_dots(lora_f32) == [] and weight_sized_dots(lora_nf4) == []
    # With the base held as int codes, no float array has a stacked weight's shape anywhere:
    # no gradient, Adam moment or master copy of the base, and the codes are dequantised one
    # layer at a time, never as a stack.
    assert stacked_float_buffers(lora_nf4) == []

    for steps, step in ((f32_steps, lora_f32), (nf4_steps, lora_nf4)):
        mem = step.memory_analysis()
        frozen = state_bytes(steps.abstract_frozen, steps.frozen_shardings)
        state = state_bytes(steps.abstract_state, steps.state_shardings)
        rows = BATCH[0] // FSDP
        batch = 4 * rows * BATCH[1] * 4
        # Arguments: the frozen base, the adapters' state (adapters, Adam moments, step), the
        # batch; nothing else: Adam holds 2 moments of the adapters, none of the base.
        assert mem.argument_size_in_bytes == pytest.approx(frozen + state + batch, rel=0.01)
        adapters_bytes = state_bytes(steps.abstract_state.params, steps.params_shardings)
        assert state == pytest.approx(3 * adapters_bytes, rel=0.01)
        # The optimizer's moments are the adapters' shapes only.
        adapters = {tuple(x.value.shape) for x in jax.tree.leaves(
            steps.abstract_state.params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))}
        moments = {tuple(x.shape) for x in jax.tree.leaves(nn.unbox(
            steps.abstract_state.opt_state)) if x.ndim > 1}
        assert moments <= adapters and all(lora.is_adapter(p) for p in _paths(
            steps.abstract_state.params))
    # Temporaries: the full step's hold the base's fp32 gradients on top of what a LoRA step
    # needs (same fp32 compute as the LoRA-f32 step).
    grads = state_bytes(full_steps.abstract_state.params, full_steps.params_shardings)
    assert lora_f32.memory_analysis().temp_size_in_bytes + grads < (
        full.memory_analysis().temp_size_in_bytes)


def _paths(tree, prefix=()):
    out = []
    for k, v in tree.items():
        p = (*prefix, k)
        out += _paths(v, p) if isinstance(v, dict) else [p]
    return out
