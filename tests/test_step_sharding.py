"""The sharded train step on real fake-CPU meshes, gradient accumulation, compiled memory."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import GQA_4L, LOSS_4L, MEMORY_8L, MEMORY_8L_V512
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sorted_jax.model import modeling
from sorted_jax.objective import soft
from sorted_jax.parallel import sharding
from sorted_jax.tools import hlo_stats
from sorted_jax.training import train_step

CFG = GQA_4L
EXITS = (2, 3, 4)


def make_batch(b=8, t=16, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, CFG.vocab_size, (b, t)).astype(np.int32)
    lengths = rng.randint(t // 2, t + 1, b)
    attn = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    mask = (rng.rand(b, t) > 0.3).astype(np.float32) * attn
    return {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": mask,
            "attention_mask": attn}


def build(mesh_shape, grad_accum=1, exits=EXITS, model=None):
    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (conftest sets it)")
    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:n])
    tx, sched = train_step.make_optimizer(lr=1e-3, total_steps=10, warmup_steps=0)
    return train_step.SoftSteps(model or modeling.make_model(CFG), exits=exits, tx=tx, mesh=mesh,
                                grad_accum=grad_accum, schedule=sched, rows_per_chunk=32)


def run_steps(steps, batches):
    state = steps.init_state(jax.random.PRNGKey(0))
    losses = []
    for batch in batches:
        state, metrics = steps.train_step(state, train_step.to_global_batch(
            batch, steps.batch_shardings))
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params), metrics


def assert_trees_close(a, b, tol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        err = np.linalg.norm((x - y).ravel()) / np.linalg.norm(y.ravel())
        assert err < tol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def single_device_run():
    return run_steps(build((1, 1, 1)), [make_batch(seed=0), make_batch(seed=1)])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_meshes_match_one_device(mesh_shape, single_device_run):
    ref_losses, ref_params, _ = single_device_run
    steps = build(mesh_shape)
    losses, params, _ = run_steps(steps, [make_batch(seed=0), make_batch(seed=1)])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params, 1e-5)
    # The updated params are different from the init: the comparison is not vacuous.
    init = jax.tree.map(np.asarray, steps.init_state(jax.random.PRNGKey(0)).params)
    moved = np.linalg.norm(params["lm_head"]["kernel"] - init["lm_head"]["kernel"])
    assert moved > 1e-3


def test_parameter_shardings_really_split_arrays():
    steps = build((2, 2, 2))
    state = steps.init_state(jax.random.PRNGKey(0))
    q = state.params["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, embed, heads, hd]
    assert q.shape == (4, 64, 4, 16)
    assert {s.data.shape for s in q.addressable_shards} == {(4, 32, 2, 16)}
    up = state.params["layers"]["mlp"]["up_proj"]["kernel"]  # [layers, embed, mlp]
    assert {s.data.shape for s in up.addressable_shards} == {(4, 32, 64)}
    head = state.params["lm_head"]["kernel"]  # [embed, vocab]
    assert {s.data.shape for s in head.addressable_shards} == {(32, CFG.vocab_size // 2)}
    # Adam moments follow their params.
    mu = state.opt_state[1][0].mu["layers"]["mlp"]["up_proj"]["kernel"]
    assert mu.sharding.is_equivalent_to(up.sharding, mu.ndim)
    # 1 kv head per tensor shard would not divide 2 kv heads by 4: here 2 / 2 does.
    k = state.params["layers"]["self_attn"]["k_proj"]["kernel"]
    assert {s.data.shape for s in k.addressable_shards} == {(4, 32, 1, 16)}


def test_indivisible_axis_is_replicated_not_an_error():
    mesh = sharding.make_mesh((1, 1, 8), jax.devices()[:8])
    spec = sharding.spec_for(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh)
    assert spec == jax.sharding.PartitionSpec(None, None, None)
    spec = sharding.spec_for(("embed", "vocab"), (64, 128), mesh)
    assert spec == jax.sharding.PartitionSpec(None, "tensor")


def test_gradient_accumulation_equals_whole_batch():
    whole = make_batch(b=8, seed=5)
    l1, p1, m1 = run_steps(build((2, 1, 1)), [whole])
    l4, p4, m4 = run_steps(build((2, 1, 1), grad_accum=4), [whole])
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    for e in EXITS:
        np.testing.assert_allclose(float(m4[f"loss/exit_{e}"]), float(m1[f"loss/exit_{e}"]),
                                   rtol=1e-5)
    assert_trees_close(p4, p1, 1e-5)


def test_eval_step_matches_train_metrics():
    steps = build((1, 1, 1))
    state = steps.init_state(jax.random.PRNGKey(0))
    batch = train_step.to_global_batch(make_batch(seed=3), steps.batch_shardings)
    sums = steps.eval_step(state.params, batch)
    _, metrics = steps.train_step(state, batch)
    for i, e in enumerate(EXITS):
        np.testing.assert_allclose(float(sums.loss[i] / sums.tokens),
                                   float(metrics[f"loss/exit_{e}"]), rtol=1e-6)


def test_clear_errors_before_compiling():
    with pytest.raises(sharding.MeshError, match="needs 6 devices, but 8"):
        sharding.make_mesh((2, 3, 1), jax.devices()[:8])
    with pytest.raises(sharding.MeshError, match="does not divide"):
        sharding.make_mesh((3, -1, 1), jax.devices()[:8])
    steps = build((8, 1, 1))
    with pytest.raises(sharding.MeshError, match="not divisible by the data-parallel size 8"):
        steps.check_batch(12)
    with pytest.raises(soft.ExitError, match="out of range"):
        build((1, 1, 1), exits=(0, 4))
    with pytest.raises(soft.ExitError, match="out of range"):
        build((1, 1, 1), exits=(5,))
    with pytest.raises(soft.ExitError, match="empty"):
        build((1, 1, 1), exits=())


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
# Gradient scale: plain SGD (no clipping) makes the update lr x the raw gradient, which Adam's
# first step (~lr x sign(g)) and clipping would hide. lr = 2^10 keeps `before - after` exact
# enough in fp32 (norm scales are ~1, their gradients ~1e-3).


def naive_loss_and_grad(params, batch, exits, weights):
    """jax.grad of the paper's loss on the whole batch, every exit's [B, T, V] logits at once."""
    model = modeling.make_model(CFG)
    ids, attn = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    targets, mask = jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_mask"])

    def loss(p):
        hidden = model.apply({"params": p}, ids, attention_mask=attn).hidden  # every layer
        logits = model.apply({"params": p}, hidden[np.asarray(exits) - 1], method=model.head)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[None, ..., None], -1)[..., 0]
        per_exit = jnp.sum(ce * mask, axis=(1, 2)) / jnp.sum(mask)
        return jnp.sum(jnp.asarray(weights) * per_exit)

    return jax.value_and_grad(loss)(params)


LR = 1024.0


@pytest.mark.parametrize("mesh_shape,grad_accum", [
    ((1, 1, 1), 1), ((8, 1, 1), 1), ((1, 8, 1), 1), ((2, 2, 2), 1), ((2, 1, 1), 4),
    ((1, 2, 2), 2)])
def test_step_gradient_equals_naive_full_batch_gradient(mesh_shape, grad_accum):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 fake CPU devices (conftest sets XLA_FLAGS)")
    exits, weights = (2, 3, 4), np.array([0.2, 0.3, 0.5], np.float32)
    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:n])
    steps = train_step.SoftSteps(modeling.make_model(CFG), exits=exits, tx=optax.sgd(LR),
                                 mesh=mesh, exit_weights=list(weights), grad_accum=grad_accum,
                                 rows_per_chunk=32)
    batch = make_batch(seed=11)
    state = steps.init_state(jax.random.PRNGKey(3))
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = steps.train_step(state, train_step.to_global_batch(batch,
                                                                        steps.batch_shardings))
    grads = jax.tree.map(lambda a, b: (a - np.asarray(b)) / LR, before, state.params)
    ref_loss, ref_grads = naive_loss_and_grad(before, batch, exits, weights)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5)
    assert_trees_close(grads, jax.tree.map(np.asarray, ref_grads), 1e-4)
    np.testing.assert_allclose(float(metrics["grad_norm"]),
                               float(optax.tree.norm(ref_grads)), rtol=1e-4)


def test_bf16_params_learn_through_an_fp32_master_copy():
    """lr 2e-5, bf16 params: the master copy takes every update (fp32-like), the params are
    exactly its cast, and without it the RMSNorm scales (1.0) never move at all."""
    mesh = sharding.make_mesh((2, 1, 1), jax.devices()[:2])
    batch = train_step.to_global_batch(make_batch(seed=4), sharding.batch_sharding(mesh))

    def run(master_weights, param_dtype=jnp.bfloat16, start=None, steps_=3):
        tx, _ = train_step.make_optimizer(lr=2e-5, total_steps=10, clip_norm=None)
        steps = train_step.SoftSteps(modeling.make_model(CFG, param_dtype=param_dtype),
                                     exits=EXITS, tx=tx, mesh=mesh, rows_per_chunk=32,
                                     master_weights=master_weights)
        state = (steps.init_state(jax.random.PRNGKey(0)) if start is None else
                 steps.state_from_params(jax.tree.map(lambda x: x.astype(param_dtype), start)))
        init = jax.tree.map(np.asarray, state.opt_state.master if master_weights in (
            None, True) else state.params)  # the fp32 weights the optimizer starts from
        for _ in range(steps_):
            state, _ = steps.train_step(state, batch)
        return steps, init, state

    steps, init, state = run(None)
    assert steps.master_weights  # automatic for bf16 params
    master = state.opt_state.master
    for (path, m), p0, p in zip(jax.tree_util.tree_leaves_with_path(master),
                                jax.tree.leaves(init), jax.tree.leaves(state.params),
                                strict=True):
        assert p.dtype == jnp.bfloat16 and m.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))
        moved = np.mean(np.asarray(m) != p0)
        if "embed_tokens" in jax.tree_util.keystr(path):
            continue  # only the rows of tokens in the batch get a gradient
        assert moved > 0.9, (jax.tree_util.keystr(path), moved)
    _, init_plain, plain = run(False)
    norm = np.asarray(plain.params["layers"]["input_layernorm"]["scale"], np.float32)
    np.testing.assert_array_equal(norm, np.asarray(init_plain["layers"]["input_layernorm"][
        "scale"], np.float32))  # the update rounds away
    # fp32 params from the same weights: the master copy follows the fp32 run's updates.
    _, init_ref, ref = run(False, jnp.float32, start=init)
    for name in ("lm_head", "norm"):
        leaf = "kernel" if name == "lm_head" else "scale"
        delta_master = np.asarray(master[name][leaf]) - init[name][leaf]
        delta_ref = np.asarray(ref.params[name][leaf]) - init_ref[name][leaf]
        # Adam amplifies the bf16 forward's tiny gradient differences on a few entries.
        assert np.corrcoef(delta_master.ravel(), delta_ref.ravel())[0, 1] > 0.98, name
        assert np.mean(np.abs(delta_master - delta_ref)) < 0.05 * np.mean(np.abs(delta_ref))


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
