"""Exit adapters on a frozen trunk, and the anchored step: model, gradients, bit-identity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_batch

from sorted_jax.model import exit_adapters, modeling
from sorted_jax.model.config import ConfigError, LlamaConfig
from sorted_jax.parallel import sharding
from sorted_jax.training import train_step

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, exit_adapters=(2, 3))
EXITS = (2, 3, 4)
WEIGHTS = np.array([0.2, 0.3, 0.5], np.float32)
LR = 1024.0


def make_batch(b=8, t=16, seed=0):
    return random_batch(CFG.vocab_size, b, t, seed)


def params_with_trained_adapters(seed=0):
    """Random trunk; adapters moved away from their initial copies (so they are their own)."""
    params = modeling.init_params(modeling.make_model(CFG), jax.random.PRNGKey(seed))
    noise = jax.random.PRNGKey(seed + 100)
    leaves, tree = jax.tree.flatten(params["exit_adapters"])
    keys = jax.random.split(noise, len(leaves))
    params["exit_adapters"] = jax.tree.unflatten(tree, [
        x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)])
    return params


def plain_state(params, config, depth, ids, attn):
    """The final (pre-norm) state of the plain depth-k sub-model (+ adapter): the reference."""
    sub, sub_cfg = exit_adapters.submodel_params(params, config, depth)
    out = modeling.make_model(sub_cfg).apply({"params": sub}, ids, attention_mask=attn,
                                              exits=(sub_cfg.num_hidden_layers,))
    return out.hidden[0], sub_cfg


def test_config_checks_and_round_trips_adapters():
    assert LlamaConfig.from_hf_dict(CFG.to_hf_dict()) == CFG
    assert "exit_adapters" not in CFG.replace(exit_adapters=()).to_hf_dict()
    for bad in ((4,), (3, 2), (0,)):
        with pytest.raises(ConfigError, match="exit_adapters"):
            CFG.replace(exit_adapters=bad)
    assert CFG.submodel(3).exit_adapters == ()


def test_an_adapter_copied_from_the_next_layer_is_that_layer():
    """At init, exit k's adapter is a copy of layer k + 1: its state is the trunk's at k + 1."""
    model = modeling.make_model(CFG)
    params = modeling.init_params(model, jax.random.PRNGKey(0))
    b = make_batch()
    ids, attn = jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])
    every = model.apply({"params": params}, ids, attention_mask=attn).hidden  # [L, B, T, D]
    adapted = exit_adapters.apply_adapters(model, params, every[np.asarray(EXITS) - 1], EXITS,
                                           attention_mask=attn)
    np.testing.assert_allclose(adapted[0], every[2], rtol=1e-5, atol=1e-5)  # exit 2 -> layer 3
    np.testing.assert_allclose(adapted[1], every[3], rtol=1e-5, atol=1e-5)  # exit 3 -> layer 4
    np.testing.assert_array_equal(adapted[2], every[3])  # the last exit: the trunk's own
    last = exit_adapters.init_adapters(params, CFG, "last")["exit_adapters"]
    np.testing.assert_array_equal(last["mlp"]["up_proj"]["kernel"][0],
                                  params["layers"]["mlp"]["up_proj"]["kernel"][3])


def test_adapted_exit_equals_the_exported_plain_submodel():
    model = modeling.make_model(CFG)
    params = params_with_trained_adapters()
    b = make_batch(seed=2)
    ids, attn = jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])
    hidden = model.apply({"params": params}, ids, attention_mask=attn, exits=EXITS).hidden
    adapted = exit_adapters.apply_adapters(model, params, hidden, EXITS, attention_mask=attn)
    for j, depth in enumerate(EXITS):
        ref, sub_cfg = plain_state(params, CFG, depth, ids, attn)
        assert sub_cfg.num_hidden_layers == depth + (depth in CFG.exit_adapters)
        np.testing.assert_allclose(adapted[j], ref, rtol=1e-5, atol=1e-5)


def naive_adapter_loss(adapters, trunk, batch, distill):
    """jax.grad reference: every exit through its own plain sub-model, [B, T, V] logits."""
    ids, attn = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    targets, mask = jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_mask"])
    params = {**trunk, "exit_adapters": adapters}
    head = modeling.make_model(CFG)
    logps = []
    for depth in EXITS:
        h, _ = plain_state(params, CFG, depth, ids, attn)
        logps.append(jax.nn.log_softmax(head.apply({"params": params}, h, method=head.head)))
    logp = jnp.stack(logps)
    ce = -jnp.take_along_axis(logp, targets[None, ..., None], -1)[..., 0]
    n = jnp.sum(mask)
    total = jnp.sum(jnp.asarray(WEIGHTS) * jnp.sum(ce * mask, axis=(1, 2)) / n)
    last = jax.lax.stop_gradient(logp[-1])
    kl = jnp.sum(jnp.exp(last) * (last - logp), -1)
    return total + distill * jnp.sum(jnp.sum(kl[:-1] * mask, axis=(1, 2)) / n)


@pytest.mark.parametrize("mesh_shape,grad_accum", [((1, 1, 1), 1), ((2, 2, 2), 1),
                                                   ((8, 1, 1), 2)])
def test_adapter_step_trains_adapters_only_with_the_naive_gradient(mesh_shape, grad_accum):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 fake CPU devices (conftest sets XLA_FLAGS)")
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
    steps = train_step.SoftSteps(modeling.make_model(CFG), exits=EXITS, tx=optax.sgd(LR),
                                 mesh=mesh, exit_weights=list(WEIGHTS), grad_accum=grad_accum,
                                 rows_per_chunk=32, distill_weight=0.3,
                                 trainable_keys=("exit_adapters",))
    state = steps.state_from_params(params_with_trained_adapters(seed=1))
    before = jax.tree.map(np.asarray, state.params)
    batch = make_batch(seed=5)
    for _ in range(2):  # the second step too: nothing drifts in the frozen trunk
        state, metrics = steps.train_step(state, train_step.to_global_batch(
            batch, steps.batch_shardings))
        if _ == 0:
            first = jax.tree.map(np.asarray, state.params)
    after = jax.tree.map(np.asarray, state.params)
    trunk = exit_adapters.trunk_params(before)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(trunk),
                            jax.tree.leaves(exit_adapters.trunk_params(after)), strict=True):
        assert np.array_equal(x, y), f"trunk weight {jax.tree_util.keystr(path)} changed"
    # The optimizer holds state for the adapters only (sgd: none at all beyond its marker).
    assert all(x.size < 8 for x in jax.tree.leaves(state.opt_state))
    grads = jax.tree.map(lambda a, b: (a - b) / LR, before["exit_adapters"],
                         first["exit_adapters"])
    ref = jax.grad(naive_adapter_loss)(jax.tree.map(jnp.asarray, before["exit_adapters"]),
                                       jax.tree.map(jnp.asarray, trunk), batch, 0.3)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref),
                            strict=True):
        err = np.linalg.norm(g - np.asarray(r)) / np.linalg.norm(np.asarray(r))
        assert err < 1e-3, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"
    assert float(metrics["kl_to_last/exit_4"]) == pytest.approx(0.0, abs=1e-5)


def test_the_compiled_adapter_step_computes_no_trunk_gradient():
    """The trunk is not differentiated: the step has far fewer dot FLOPs than a full step."""
    from sorted_jax.tools import hlo_stats

    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])

    def flops(**kw):
        steps = train_step.SoftSteps(modeling.make_model(CFG), exits=EXITS, tx=optax.sgd(1.0),
                                     mesh=mesh, rows_per_chunk=32, **kw)
        return hlo_stats.analyse(steps.lower_train_step((8, 16)).compile().as_text()).dot_flops

    full, adapters = flops(), flops(trainable_keys=("exit_adapters",))
    # full: 6 layers fwd+bwd (trunk 4 + 2 adapters); adapters: trunk fwd + 2 adapters fwd+bwd
    assert adapters < 0.6 * full, (adapters, full)
