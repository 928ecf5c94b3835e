"""What XLA compiles for the train step (its per-device program on fake CPU devices, never
run): memory flat in the number of exits, SFT costing a plain causal-LM step, a data-parallel
loss, and no device ever holding the global batch."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import LOSS_4L, MEMORY_8L, MEMORY_8L_V512
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sorted_jax.model import modeling
from sorted_jax.objective import soft
from sorted_jax.parallel import sharding
from sorted_jax.tools import hlo_stats
from sorted_jax.training import train_step

# ---------------------------------------------------------------------------------------------
# Memory: XLA's compiled memory analysis on one device.


def test_soft_step_temporaries_are_flat_in_the_number_of_exits():
    """XLA's compiled memory analysis (deterministic): 4 exits cost <= 1.10x one exit.

    Shape from the issue: width 256, vocab 32000, 8 layers, 8192 tokens a step. The naive
    4-exit loss is measured too, to show the comparison can see a difference.
    """
    import jax.numpy as jnp

    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    tx, _ = train_step.make_optimizer(lr=1e-3, total_steps=10)

    def compiled(exits):
        model = modeling.make_model(MEMORY_8L, remat_policy="full")
        steps = train_step.SoftSteps(model, exits=exits, tx=tx, mesh=mesh)
        return steps.lower_train_step((8, 1024)).compile()

    def loop_state_types(program):
        return [i.type for comp in hlo_stats.Program.parse(program.as_text()).computations.values()
                for i in comp if i.opcode == "while"]

    sft_program, soft_program = compiled((8,)), compiled((2, 4, 6, 8))
    sft = sft_program.memory_analysis().temp_size_in_bytes
    soft4 = soft_program.memory_analysis().temp_size_in_bytes
    assert soft4 <= 1.10 * sft, (soft4, sft)
    # The layer scan carries the 4 exits' states [K, B, T, D], not a stack of all 8 layers
    # (the [8, ...] in its state is the backward pass' per-layer carry, saved under remat);
    # SFT carries no exit buffer at all.
    assert any("f32[4,8,1024,256]" in t for t in loop_state_types(soft_program))
    assert not any("f32[1,8,1024,256]" in t for t in loop_state_types(sft_program))

    h = jax.ShapeDtypeStruct((8, 8, 1024, 256), jnp.float32)
    s, k = jax.ShapeDtypeStruct((256,), jnp.float32), jax.ShapeDtypeStruct((256, 32000),
                                                                          jnp.float32)
    t = jax.ShapeDtypeStruct((8, 1024), jnp.int32)
    m = jax.ShapeDtypeStruct((8, 1024), jnp.float32)

    def naive_loss_grad_bytes(exits):
        w = np.full(len(exits), 1 / len(exits), np.float32)

        def grads(h, s, k, t, m):
            def loss(h, s, k):
                return soft.naive_exit_losses(soft.select_exits(h, exits), s, k, t, m, w,
                                              eps=1e-5)[0]
            return jax.grad(loss, argnums=(0, 1, 2))(h, s, k)

        return jax.jit(grads).lower(h, s, k, t, m).compile().memory_analysis().temp_size_in_bytes

    assert naive_loss_grad_bytes((2, 4, 6, 8)) > 3 * naive_loss_grad_bytes((8,))


def test_sft_step_costs_what_a_plain_causal_lm_step_costs():
    """SFT through SoftSteps (exit set {L}) vs the textbook step (final logits, optax CE):
    temporaries within 5% at a small vocab, where the logits do not dominate and any extra
    stack of hidden states would show."""
    import flax.linen as nn

    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    tx, _ = train_step.make_optimizer(lr=1e-3, total_steps=10)
    model = modeling.make_model(MEMORY_8L_V512, remat_policy="full")
    steps = train_step.SoftSteps(model, exits=(8,), tx=tx, mesh=mesh)
    ours = steps.lower_train_step((8, 1024)).compile().memory_analysis().temp_size_in_bytes
    state = jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x,
                         steps.abstract_state,
                         is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))

    def plain_step(state, batch):
        def loss(p):
            h = model.apply({"params": p}, batch["input_ids"],
                            attention_mask=batch["attention_mask"], exits=(8,)).hidden[-1]
            logits = model.apply({"params": p}, h, method=model.head)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            return jnp.sum(ce * batch["loss_mask"]) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1)

        value, grads = jax.value_and_grad(loss)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state, step=state.step + 1), value

    batch = {k: jax.ShapeDtypeStruct((8, 1024), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in ("input_ids", "targets", "loss_mask", "attention_mask")}
    with sharding.activation_sharding(mesh):
        plain = jax.jit(plain_step, donate_argnums=0).lower(state, batch).compile()
    plain_bytes = plain.memory_analysis().temp_size_in_bytes
    assert ours <= 1.05 * plain_bytes, (ours, plain_bytes)


# ---------------------------------------------------------------------------------------------
# The compiled per-device program (8 fake CPU devices): the loss is data parallel.

def compiled_step(mesh_shape, cfg=LOSS_4L, exits=(2, 3, 4), batch=(16, 128), rows=96,
                  remat="none"):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 fake CPU devices (conftest sets XLA_FLAGS)")
    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:n])
    tx, _ = train_step.make_optimizer(lr=1e-3, total_steps=10)
    steps = train_step.SoftSteps(modeling.make_model(cfg, remat_policy=remat), exits=exits,
                                 tx=tx, mesh=mesh, rows_per_chunk=rows)
    return steps.lower_train_step(batch).compile()


def compiled_stats(mesh_shape, **kw):
    compiled = compiled_step(mesh_shape, **kw)
    return hlo_stats.analyse(compiled.as_text()), compiled.memory_analysis()


@pytest.mark.parametrize("mesh_shape,batch_shards,vocab_shards", [
    ((8, 1, 1), 8, 1), ((1, 8, 1), 8, 1), ((2, 2, 2), 4, 2)])
def test_loss_logits_cover_only_this_devices_rows(mesh_shape, batch_shards, vocab_shards):
    """Issue shape: L=4, B=16, T=128, D=128, V=2048, exits (2,3,4). Each device computes the
    logits of its own B / batch_shards rows (and V / vocab_shards columns), in K x rows chunks
    within the per-device budget, and its loss loop gathers nothing."""
    from sorted_jax.objective.exit_loss import row_chunks

    stats, _ = compiled_stats(mesh_shape)
    k, b, t, v = 3, 16, 128, 2048
    plan = row_chunks(b // batch_shards * t, k, 96)
    assert plan.rows * plan.chunks >= b // batch_shards * t
    loss_loops = [(name, n) for name, n in stats.loops if "shard_map" in name]
    assert loss_loops == [(loss_loops[0][0], plan.chunks)], stats.loops
    logits = {d.dims for d in stats.dots if d.inside("shard_map") and v // vocab_shards in d.dims
              and d.dims[0] != 128}
    # forward logits and the gradient's [rows, V] operand: K x rows, this device's vocab shard
    assert logits == {(k * plan.rows, v // vocab_shards)}, logits
    in_loss = [c for c in stats.collectives if c.inside("shard_map")]
    assert not [c for c in in_loss if c.opcode.startswith("all-gather")], in_loss
    # With a vocab split the loop reduces [rows] vectors (logsumexp, target logit, argmax) only.
    assert all(c.bytes <= 3 * 4 * k * plan.rows for c in in_loss), in_loss
    assert bool(in_loss) == (vocab_shards > 1)


def test_per_device_cost_falls_with_the_batch_sharding_degree():
    """The memory-test shape (width 256, vocab 32000, 8 layers, 8 x 1024 tokens, full remat):
    8-way data parallel (data or fsdp) needs <= 0.25x the temporaries of one device and 1/8 of
    its dot FLOPs. The loss chunk (K x rows x V floats) is a per-device budget, the same on any
    mesh, so it is kept small here (512 rows) to let everything else show."""
    kw = dict(cfg=MEMORY_8L, exits=(2, 4, 6, 8), batch=(8, 1024), rows=512, remat="full")
    one, one_mem = compiled_stats((1, 1, 1), **kw)
    for mesh_shape in [(8, 1, 1), (1, 8, 1)]:
        stats, mem = compiled_stats(mesh_shape, **kw)
        assert mem.temp_size_in_bytes <= 0.25 * one_mem.temp_size_in_bytes, mesh_shape
        assert stats.dot_flops == pytest.approx(one.dot_flops / 8, rel=0.02), mesh_shape
    # The loss' dots are most of the FLOPs at this shape: the loss is what had to scale.
    loss = sum(d.count * d.flops for d in one.dots
               if d.loops and not any("run_layers" in name for name in d.loops))
    assert loss == pytest.approx(6 * 256 * 32000 * 4 * 8 * 1024, rel=0.01)  # 6 D V K tokens
    assert loss > 0.6 * one.dot_flops


# ---------------------------------------------------------------------------------------------
# No device holds the global batch. GLOBAL_BATCH's B = 24 is no other dimension of LOSS_4L's
# step (nor are B x T and K x B x T), so any array with such a dimension, in any position, is
# the whole batch on one device; a batch-sharded program holds B / shards rows only.

GLOBAL_BATCH = (24, 96)
_ARRAY = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")


def arrays_with_global_batch(hlo_text: str, batch: tuple[int, int], exits: int
                             ) -> list[tuple[str, str]]:
    """(opcode, array type) of every array in a compiled per-device program with a dimension
    only the global batch has: B rows, B x T or K x B x T flattened rows. Every instruction
    is looked at (inside fusions and loops too, tuple elements included) and every
    computation's parameters, not just the collectives' results."""
    b, t = batch
    global_dims = {b, b * t, exits * b * t}
    program = hlo_stats.Program.parse(hlo_text)
    typed = [(w.instruction.opcode, w.instruction.type) for w in program.weighted()]
    typed += [("parameter", text) for params in program.params.values()
              for text in params.values()]
    return [(opcode, m.group(0)) for opcode, text in typed for m in _ARRAY.finditer(text)
            if global_dims & {int(d) for d in m.group(1).split(",") if d}]


@pytest.mark.parametrize("mesh_shape,batch_shards", [((8, 1, 1), 8), ((1, 8, 1), 8),
                                                     ((2, 2, 2), 4)])
def test_no_array_in_the_step_holds_the_global_batch(mesh_shape, batch_shards):
    """No device ever holds the whole batch's tokens, activations, exit states or their
    gradients: no array of the compiled step has the global batch's rows, whichever position
    they are in. (The embedding lookup from a vocab x fsdp split table used to replicate
    them.)"""
    text = compiled_step(mesh_shape, batch=GLOBAL_BATCH).as_text()
    assert not arrays_with_global_batch(text, GLOBAL_BATCH, exits=3)
    # Not vacuous: the program's batch inputs are this device's [B / shards, T] rows.
    b, t = GLOBAL_BATCH
    program = hlo_stats.Program.parse(text)
    inputs = list(program.params[program.entry].values())
    assert sum(f"s32[{b // batch_shards},{t}]" in x for x in inputs) == 3, inputs  # ids, ...


def test_the_global_batch_check_catches_a_replicated_exit_stack(monkeypatch):
    """The check above sees what a check of [B, T]-led shapes missed: the same step with the
    [K, B, T, D] exit stack constrained to be replicated before the loss (an all-gather of
    every exit's hidden states onto every device) is flagged, at the stack's global shape."""
    multi_exit_losses = soft.multi_exit_losses

    def on_every_device(hidden, *args, **kw):
        return multi_exit_losses(jax.lax.with_sharding_constraint(hidden, P()), *args, **kw)

    monkeypatch.setattr(soft, "multi_exit_losses", on_every_device)
    text = compiled_step((2, 2, 2), batch=GLOBAL_BATCH).as_text()
    b, t = GLOBAL_BATCH
    found = arrays_with_global_batch(text, GLOBAL_BATCH, exits=3)
    assert ("all-gather", f"f32[3,{b},{t},{LOSS_4L.hidden_size}]") in found, found


@pytest.mark.parametrize("shape,batch_axis", [
    ((96, 24, 8), 1),  # the batch in the middle
    ((24 * 96, 8), 0),  # flattened token rows
    ((3 * 24 * 96, 8), 0),  # flattened exit x token rows
])
def test_the_global_batch_check_sees_any_position_and_flattened_rows(shape, batch_axis):
    """An array split over the batch axes and gathered onto every device is flagged; kept
    split, it is not."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 fake CPU devices (conftest sets XLA_FLAGS)")
    mesh = sharding.make_mesh((2, 4, 1), jax.devices()[:8])
    split = NamedSharding(mesh, P(*[None] * batch_axis, ("data", "fsdp")))

    def program(out_sharding):
        x = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=split)
        return jax.jit(lambda x: 2 * x, out_shardings=out_sharding).lower(x).compile().as_text()

    gathered = arrays_with_global_batch(program(NamedSharding(mesh, P())), GLOBAL_BATCH, 3)
    assert ("all-gather", f"f32[{','.join(map(str, shape))}]") in gathered, gathered
    assert not arrays_with_global_batch(program(split), GLOBAL_BATCH, 3)
