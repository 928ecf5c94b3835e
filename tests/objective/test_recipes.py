"""Recipe knobs of the SoFT loss: weight schemes, exit sets by depth, curriculum, distillation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import W32_3L

from sorted_jax.objective import soft
from sorted_jax.parallel import sharding


def test_weight_schemes_give_the_weights_they_document():
    exits = (2, 4, 6, 8)
    np.testing.assert_allclose(soft.weight_scheme("uniform", exits), [0.25] * 4)
    np.testing.assert_allclose(soft.weight_scheme("last", exits), [1 / 6, 1 / 6, 1 / 6, 0.5],
                               rtol=1e-6)
    np.testing.assert_allclose(soft.weight_scheme("last:0.7", exits), [0.1, 0.1, 0.1, 0.7],
                               rtol=1e-6)
    np.testing.assert_allclose(soft.weight_scheme("depth", exits), np.array(exits) / 20,
                               rtol=1e-6)
    sq = np.sqrt(exits)
    np.testing.assert_allclose(soft.weight_scheme("sqrt", exits), sq / sq.sum(), rtol=1e-6)
    np.testing.assert_allclose(soft.weight_scheme("last", (8,)), [1.0])
    # the deepest exit, wherever it is in the given order; pairs sorted together
    got_exits, w = soft.resolve_exit_set("8,2,4", "last:0.6", 8)
    assert got_exits == (2, 4, 8)
    np.testing.assert_allclose(w, [0.2, 0.2, 0.6], rtol=1e-6)
    # explicit numbers are used as given
    np.testing.assert_allclose(soft.resolve_exit_weights("1,2", (3, 4)), [1, 2])
    for bad, match in [("deep", "unknown exit weight scheme"), ("last:0", "0 < F <= 1"),
                       ("last:x", "0 < F <= 1"), ("1,a", "comma-separated")]:
        with pytest.raises(soft.ExitError, match=match):
            soft.resolve_exit_weights(bad, exits)


def test_exit_sets_by_depth_fraction():
    assert soft.resolve_exits("from=0.375", 32) == (12, 16, 20, 24, 28, 32)  # the paper's
    assert soft.resolve_exits("from=0.3", 40) == (15, 20, 25, 30, 35, 40)
    assert soft.resolve_exits("from=0.4,step=2", 10) == (4, 6, 8, 10)
    assert soft.resolve_exits("from=0.5,step=3", 8) == (5, 8)
    assert soft.resolve_exits("from=1", 8) == (8,)
    for bad in ("from=0", "from=1.5", "from=x", "from=0.5,step=0", "from=0.5,every=2"):
        with pytest.raises(soft.ExitError, match="from=F"):
            soft.resolve_exits(bad, 8)


def test_curriculum_weights_at_given_steps():
    target = (0.25, 0.25, 0.5)
    sched = soft.ExitSchedule(target, ramp_steps=4, hold_steps=2)
    expect = {0: [0, 0, 1], 1: [0, 0, 1], 2: [0, 0, 1], 3: [1 / 16, 1 / 16, 0.875],
              4: [0.125, 0.125, 0.75], 6: list(target), 100: list(target)}
    for step, w in expect.items():
        np.testing.assert_allclose(sched.at(step, np), w, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(jax.jit(sched.at)(jnp.asarray(step)), w, rtol=1e-6,
                                   atol=1e-7)
    # the weights' sum (the loss scale) is the same at every step
    for step in range(10):
        assert float(np.sum(sched.at(step, np))) == pytest.approx(1.0)
    np.testing.assert_allclose(soft.ExitSchedule(target).at(0, np), target)  # the paper
    jump = soft.ExitSchedule(target, hold_steps=3)  # SFT for 3 steps, then the target
    np.testing.assert_allclose(jump.at(2, np), [0, 0, 1])
    np.testing.assert_allclose(jump.at(3, np), target)
    with pytest.raises(soft.ExitError, match=">= 0"):
        soft.ExitSchedule(target, ramp_steps=-1)


def _problem(seed=0, k=3, b=4, t=12, d=16, v=40):
    rng = np.random.RandomState(seed)
    hidden = jnp.asarray(rng.randn(k, b, t, d), jnp.float32)
    scale = jnp.asarray(1 + 0.2 * rng.randn(d), jnp.float32)
    kernel = jnp.asarray(0.4 * rng.randn(d, v), jnp.float32)
    targets = jnp.asarray(rng.randint(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.rand(b, t) > 0.3, jnp.float32)
    return hidden, scale, kernel, targets, mask


@pytest.mark.parametrize("rows", [3, 7, 10_000])
def test_distillation_value_and_gradient_equal_naive(rows):
    hidden, scale, kernel, targets, mask = _problem()
    w = np.array([0.2, 0.3, 0.5], np.float32)
    lam = soft.distill_weights(3, 0.7)
    np.testing.assert_allclose(lam, [0.7, 0.7, 0.0])

    def chunked(h, s, k):
        return soft.multi_exit_losses(h, s, k, targets, mask, w, eps=1e-5, rows_per_chunk=rows,
                                      distill_weights=lam)

    def naive(h, s, k):
        return soft.naive_exit_losses(h, s, k, targets, mask, w, eps=1e-5, distill_weights=lam)

    (v1, s1), g1 = jax.value_and_grad(chunked, argnums=(0, 1, 2), has_aux=True)(
        hidden, scale, kernel)
    (v2, s2), g2 = jax.value_and_grad(naive, argnums=(0, 1, 2), has_aux=True)(
        hidden, scale, kernel)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(s1.distill, s2.distill, rtol=1e-4, atol=1e-5)
    assert float(s1.distill[-1]) == pytest.approx(0.0, abs=1e-4)  # KL of the teacher itself
    assert np.all(np.asarray(s1.distill[:-1]) > 0)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    # the distillation term really changes the gradient (the check is not vacuous)
    (_, _), g0 = jax.value_and_grad(
        lambda h: soft.multi_exit_losses(h, scale, kernel, targets, mask, w, eps=1e-5,
                                         rows_per_chunk=rows), has_aux=True)(hidden)
    assert float(jnp.abs(g0 - g1[0]).max()) > 1e-3 * float(jnp.abs(g0).max())


def test_distillation_under_a_vocab_and_batch_split_mesh():
    """The KL's vocab reduction and the teacher per vocab shard under (data 2, tensor 2)."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 fake CPU devices")
    hidden, scale, kernel, targets, mask = _problem(seed=1, b=4, v=40)
    w = np.array([0.2, 0.3, 0.5], np.float32)
    lam = soft.distill_weights(3, 0.5)
    mesh = sharding.make_mesh((2, 1, 2), jax.devices()[:4])
    P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding

    def chunked(h, s, k):
        return soft.multi_exit_losses(h, s, k, targets, mask, w, eps=1e-5, rows_per_chunk=6,
                                      distill_weights=lam)

    with sharding.activation_sharding(mesh):
        args = (jax.device_put(hidden, NS(mesh, P(None, "data"))), scale,
                jax.device_put(kernel, NS(mesh, P(None, "tensor"))))
        (v1, s1), g1 = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2), has_aux=True))(
            *args)
    (v2, s2), g2 = jax.value_and_grad(
        lambda h, s, k: soft.naive_exit_losses(h, s, k, targets, mask, w, eps=1e-5,
                                               distill_weights=lam),
        argnums=(0, 1, 2), has_aux=True)(hidden, scale, kernel)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(s1.distill, s2.distill, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_train_step_follows_the_curriculum():
    """SoftSteps with a hold + ramp: the step reports the schedule's weights, and during the
    hold its update is exactly SFT's (plain SGD shows the raw gradient)."""
    import optax

    from sorted_jax.model import modeling
    from sorted_jax.training import train_step

    cfg = W32_3L
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    rng = np.random.RandomState(0)
    ids = rng.randint(0, cfg.vocab_size, (4, 10)).astype(np.int32)
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1),
             "loss_mask": np.ones(ids.shape, np.float32),
             "attention_mask": np.ones(ids.shape, np.int32)}

    def make(exits, **kw):
        return train_step.SoftSteps(modeling.make_model(cfg), exits=exits, tx=optax.sgd(1.0),
                                    mesh=mesh, rows_per_chunk=16, **kw)

    soft_steps = make((1, 2, 3), exit_weights=[0.2, 0.3, 0.5], exit_hold_steps=1,
                      exit_ramp_steps=2)
    sft_steps = make((3,))
    state = soft_steps.init_state(jax.random.PRNGKey(0))
    sft_state = sft_steps.state_from_params(state.params)
    b = train_step.to_global_batch(batch, soft_steps.batch_shardings)
    seen = []
    for i in range(4):
        before = jax.tree.map(np.asarray, state.params)
        state, m = soft_steps.train_step(state, b)
        seen.append([float(m[f"exit_weight/exit_{e}"]) for e in (1, 2, 3)])
        if i == 0:
            sft_state, _ = sft_steps.train_step(sft_state, b)
            for x, y, z in zip(jax.tree.leaves(before), jax.tree.leaves(state.params),
                               jax.tree.leaves(sft_state.params), strict=True):
                np.testing.assert_allclose(x - np.asarray(y), x - np.asarray(z), rtol=1e-5,
                                           atol=1e-7)
    np.testing.assert_allclose(seen, [[0, 0, 1], [0, 0, 1], [0.1, 0.15, 0.75],
                                      [0.2, 0.3, 0.5]], rtol=1e-6, atol=1e-7)
