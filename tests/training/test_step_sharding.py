"""The sharded train step run on fake-CPU meshes: the losses and gradients of one device and
of the naive full-batch gradient, gradient accumulation, really split parameters, bf16
params with an fp32 master copy. (What XLA compiles for it: test_step_compiled.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import GQA_4L, random_batch

from sorted_jax.model import modeling
from sorted_jax.objective import soft
from sorted_jax.parallel import sharding
from sorted_jax.training import train_step

CFG = GQA_4L
EXITS = (2, 3, 4)


def make_batch(b=8, t=16, seed=0):
    return random_batch(CFG.vocab_size, b, t, seed)


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
