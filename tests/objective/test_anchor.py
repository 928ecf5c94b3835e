"""Anchored SoFT: KL(p_teacher || p_k) of a frozen teacher, fused into the chunked loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sorted_jax.objective import soft
from sorted_jax.objective.exit_loss import Teacher
from sorted_jax.parallel import sharding


def _problem(seed=0, k=3, b=4, t=12, d=16, v=40):
    rng = np.random.RandomState(seed)
    f32 = jnp.float32
    student = (jnp.asarray(rng.randn(k, b, t, d), f32), jnp.asarray(1 + 0.2 * rng.randn(d), f32),
               jnp.asarray(0.4 * rng.randn(d, v), f32))
    teacher = (jnp.asarray(rng.randn(b, t, d), f32), jnp.asarray(1 + 0.2 * rng.randn(d), f32),
               jnp.asarray(0.4 * rng.randn(d, v), f32))
    targets = jnp.asarray(rng.randint(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.rand(b, t) > 0.3, f32)
    return student, teacher, targets, mask


W = np.array([0.2, 0.3, 0.5], np.float32)
ANCHOR = np.array([0.0, 0.25, 1.5], np.float32)  # the last exit most, one exit not at all


def _losses(fn, teacher_args, targets, mask, **kw):
    def loss(h, s, k):
        return fn(h, s, k, targets, mask, W, eps=1e-5,
                  teacher=Teacher(*teacher_args, ANCHOR), **kw)
    return loss


@pytest.mark.parametrize("rows", [3, 7, 10_000])
@pytest.mark.parametrize("distill", [False, True])
def test_anchor_value_and_gradient_equal_naive(rows, distill):
    student, teacher, targets, mask = _problem()
    lam = soft.distill_weights(3, 0.4) if distill else None
    chunked = _losses(soft.multi_exit_losses, teacher, targets, mask, rows_per_chunk=rows,
                      distill_weights=lam)
    naive = _losses(soft.naive_exit_losses, teacher, targets, mask, distill_weights=lam)
    (v1, s1), g1 = jax.value_and_grad(chunked, argnums=(0, 1, 2), has_aux=True)(*student)
    (v2, s2), g2 = jax.value_and_grad(naive, argnums=(0, 1, 2), has_aux=True)(*student)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(s1.anchor, s2.anchor, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(s1.anchor) > 0)  # a different model: every exit has a KL
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    # The anchor changes the gradient of the anchored exits only (the check is not vacuous).
    plain = lambda h: soft.multi_exit_losses(h, *student[1:], targets, mask, W, eps=1e-5,  # noqa: E731
                                             rows_per_chunk=rows, distill_weights=lam)
    g0 = jax.grad(lambda h: plain(h)[0])(student[0])
    diff = np.abs(np.asarray(g0 - g1[0])).max(axis=(1, 2, 3))
    assert diff[0] == pytest.approx(0.0, abs=1e-7)
    assert diff[2] > 1e-3 * float(jnp.abs(g0).max())


def test_a_teacher_equal_to_the_student_adds_nothing():
    """KL(p || p) = 0 with a zero gradient: anchoring a model to itself is plain SoFT."""
    (h, s, k), _, targets, mask = _problem(seed=2)
    same = Teacher(h[-1], s, k, ANCHOR)
    total, sums = soft.multi_exit_losses(h, s, k, targets, mask, W, eps=1e-5,
                                         rows_per_chunk=7, teacher=same)
    base, _ = soft.multi_exit_losses(h, s, k, targets, mask, W, eps=1e-5, rows_per_chunk=7)
    assert float(sums.anchor[-1]) == pytest.approx(0.0, abs=1e-4)
    np.testing.assert_allclose(total, base + float(jnp.sum(sums.anchor * ANCHOR)), rtol=1e-6)
    g = jax.grad(lambda x: soft.multi_exit_losses(x, s, k, targets, mask, W, eps=1e-5,
                                                  rows_per_chunk=7, teacher=same)[0])(h)
    g0 = jax.grad(lambda x: soft.multi_exit_losses(x, s, k, targets, mask, W, eps=1e-5,
                                                   rows_per_chunk=7)[0])(h)
    np.testing.assert_allclose(g[-1], g0[-1], atol=1e-6)


@pytest.mark.parametrize("mesh_shape", [(2, 1, 2), (1, 4, 1), (2, 2, 1)])
def test_anchor_on_a_mesh_equals_naive(mesh_shape):
    """Teacher rows sharded like the student's, its logits split over the vocab (tensor)."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 fake CPU devices")
    student, teacher, targets, mask = _problem(seed=1, b=4, v=40)
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:4])
    P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    rows = ("data", "fsdp")
    chunked = _losses(soft.multi_exit_losses, teacher, targets, mask, rows_per_chunk=6)
    with sharding.activation_sharding(mesh):
        args = (jax.device_put(student[0], NS(mesh, P(None, rows))), student[1],
                jax.device_put(student[2], NS(mesh, P(None, "tensor"))))
        t_args = (jax.device_put(teacher[0], NS(mesh, P(rows))), teacher[1],
                  jax.device_put(teacher[2], NS(mesh, P(None, "tensor"))))
        chunked = _losses(soft.multi_exit_losses, t_args, targets, mask, rows_per_chunk=6)
        (v1, s1), g1 = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2),
                                                  has_aux=True))(*args)
    naive = _losses(soft.naive_exit_losses, teacher, targets, mask)
    (v2, s2), g2 = jax.value_and_grad(naive, argnums=(0, 1, 2), has_aux=True)(*student)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(s1.anchor, s2.anchor, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_anchor_metrics_are_reported_per_exit():
    student, teacher, targets, mask = _problem()
    _, sums = _losses(soft.multi_exit_losses, teacher, targets, mask, rows_per_chunk=5)(*student)
    m = soft.exit_metrics(sums, (2, 4, 6))
    n = float(sums.tokens)
    for i, e in enumerate((2, 4, 6)):
        assert float(m[f"kl_to_teacher/exit_{e}"]) == pytest.approx(float(sums.anchor[i]) / n)
