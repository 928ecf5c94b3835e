"""The chunked multi-exit SoFT loss against a naive all-logits version and against HF PyTorch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import make_hf_llama
from helpers import GQA_4L, W32_3L

from sorted_jax.model import hf_mapping, modeling
from sorted_jax.objective import soft


def random_problem(seed=0, layers=6, b=3, t=16, d=24, v=67):
    rng = np.random.RandomState(seed)
    hidden = jnp.asarray(2.0 * rng.randn(layers, b, t, d), jnp.float32)
    scale = jnp.asarray(1 + 0.2 * rng.randn(d), jnp.float32)
    kernel = jnp.asarray(0.3 * rng.randn(d, v), jnp.float32)
    targets = jnp.asarray(rng.randint(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.rand(b, t) > 0.4, jnp.float32)
    return hidden, scale, kernel, targets, mask


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("exits", [(6,), (2, 4, 6), (1, 2, 3, 4, 5, 6), (3, 5)])
@pytest.mark.parametrize("rows", [None, 9, 10_000])  # None: one row per exit a chunk
def test_chunked_value_and_grad_equal_naive(exits, rows):
    hidden, scale, kernel, targets, mask = random_problem()
    rows = rows or len(exits)
    weights = soft.resolve_exit_weights(None, exits)
    if len(exits) > 1:
        weights = np.linspace(1.0, 2.0, len(exits)).astype(np.float32)  # explicit weights too

    def chunked(h, s, k):
        return soft.exit_losses(h, exits, s, k, targets, mask, weights, eps=1e-5,
                                rows_per_chunk=rows)

    def naive(h, s, k):
        return soft.naive_exit_losses(soft.select_exits(h, exits), s, k, targets, mask, weights,
                                      eps=1e-5)

    (v1, s1), g1 = jax.value_and_grad(chunked, argnums=(0, 1, 2), has_aux=True)(
        hidden, scale, kernel)
    (v2, s2), g2 = jax.value_and_grad(naive, argnums=(0, 1, 2), has_aux=True)(
        hidden, scale, kernel)
    assert rel(v1, v2) < 1e-5
    np.testing.assert_allclose(s1.loss, s2.loss, rtol=1e-5)
    np.testing.assert_array_equal(s1.correct, s2.correct)
    assert float(s1.tokens) == float(mask.sum())
    for a, b in zip(g1, g2, strict=True):
        assert rel(a, b) < 1e-5
    # Layers that are not exits get exactly zero gradient.
    non_exit = [i for i in range(hidden.shape[0]) if i + 1 not in exits]
    assert not np.any(np.asarray(g1[0])[non_exit])


def test_primal_path_without_grad_equals_naive():
    hidden, scale, kernel, targets, mask = random_problem(seed=1)
    exits, w = (2, 5), np.array([0.5, 0.5], np.float32)
    total, sums = jax.jit(lambda h: soft.exit_losses(h, exits, scale, kernel, targets, mask, w,
                                                     eps=1e-5, rows_per_chunk=6))(hidden)
    ref_total, ref = soft.naive_exit_losses(soft.select_exits(hidden, exits), scale, kernel,
                                            targets, mask, w, eps=1e-5)
    assert rel(total, ref_total) < 1e-5
    np.testing.assert_allclose(sums.loss, ref.loss, rtol=1e-5)


def test_bf16_hidden_states_stay_close():
    hidden, scale, kernel, targets, mask = random_problem(seed=2)
    exits = (3, 6)
    w = soft.resolve_exit_weights(None, exits)
    f = lambda h: soft.exit_losses(h, exits, scale, kernel, targets, mask, w, eps=1e-5,
                                   rows_per_chunk=16)[0]
    v32, g32 = jax.value_and_grad(f)(hidden)
    v16, g16 = jax.value_and_grad(f)(hidden.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16
    assert rel(v16, v32) < 2e-2
    assert rel(g16, g32) < 5e-2


def test_sft_mode_equals_plain_causal_lm_loss():
    """Exit set {L} is ordinary fine-tuning: masked token-mean CE of the model's logits."""
    cfg = W32_3L
    model = modeling.make_model(cfg)
    params = modeling.init_params(model, jax.random.PRNGKey(0))
    _, _, _, targets, mask = random_problem(seed=3, b=2, t=12, v=cfg.vocab_size)
    ids = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 12)))
    hidden = model.apply({"params": params}, ids).hidden
    logits = model.apply({"params": params}, hidden[-1], method=model.head)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    expected = jnp.sum(ce * mask) / jnp.sum(mask)
    scale, kernel = modeling.head_weights(params, cfg)
    total, sums = soft.exit_losses(hidden, soft.resolve_exits("last", 3), scale, kernel, targets,
                                   mask, [1.0], eps=cfg.rms_norm_eps)
    assert rel(total / sums.tokens, expected) < 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_soft_loss_equals_hf_pytorch_per_exit(tied):
    """Eq. 1 on given weights and batch, computed independently with HF + torch."""
    cfg = GQA_4L.replace(tie_word_embeddings=tied)
    hf = make_hf_llama(cfg, seed=11)
    params = hf_mapping.hf_to_params(hf.state_dict(), cfg)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, cfg.vocab_size, (3, 14))
    labels = ids.copy()
    labels[:, :5] = -100  # prompt tokens do not count
    labels[1, 10:] = -100
    exits = (2, 3, 4)

    with torch.no_grad():
        out = hf(torch.tensor(ids), output_hidden_states=True)
        per_exit = []
        for n in exits:
            h = out.hidden_states[n]
            logits = out.logits if n == cfg.num_hidden_layers else hf.lm_head(hf.model.norm(h))
            per_exit.append(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, cfg.vocab_size), torch.tensor(labels[:, 1:]).reshape(-1),
                ignore_index=-100).item())
    expected = sum(per_exit) / len(exits)

    model = modeling.make_model(cfg)
    hidden = model.apply({"params": params}, jnp.asarray(ids)).hidden
    targets = jnp.asarray(np.roll(ids, -1, axis=1))
    mask = jnp.asarray(np.roll(labels, -1, axis=1) != -100) & (jnp.arange(14) < 13)[None]
    scale, kernel = modeling.head_weights(params, cfg)
    total, sums = soft.exit_losses(hidden, exits, scale, kernel, targets, mask,
                                   soft.resolve_exit_weights(None, exits), eps=cfg.rms_norm_eps,
                                   rows_per_chunk=10)
    assert rel(total / sums.tokens, expected) < 1e-5
    np.testing.assert_allclose(np.asarray(sums.loss / sums.tokens), per_exit, rtol=1e-5)


def test_default_exits_follow_the_paper():
    assert soft.default_exits(32) == (12, 16, 20, 24, 28, 32)
    assert soft.default_exits(40) == (12, 16, 20, 24, 28, 32, 36, 40)
    assert soft.default_exits(8)[-1] == 8
    assert soft.resolve_exits("12, 20,32", 32) == (12, 20, 32)
    assert soft.resolve_exits([32, 12], 32) == (12, 32)
    assert soft.resolve_exits("all", 4) == (1, 2, 3, 4)


@pytest.mark.parametrize("exits,match", [
    ([0, 4], "out of range"), ([33], "out of range"), ([], "empty"), ("", "empty"),
    ([4, 4], "repeat"), ("a,b", "comma-separated"),
])
def test_bad_exit_sets_raise_clear_errors(exits, match):
    with pytest.raises(soft.ExitError, match=match):
        soft.resolve_exits(exits, 32)


def test_exit_weights_stay_with_their_exits():
    exits, w = soft.resolve_exit_set("32,12", [0.9, 0.1], 32)
    assert exits == (12, 32)
    np.testing.assert_allclose(w, [0.1, 0.9])
    exits, w = soft.resolve_exit_set([20, 32, 12], [2.0, 3.0, 1.0], 32)
    assert exits == (12, 20, 32)
    np.testing.assert_allclose(w, [1.0, 2.0, 3.0])
    exits, w = soft.resolve_exit_set("default", None, 32)
    assert exits == soft.default_exits(32)
    np.testing.assert_allclose(w, np.full(6, 1 / 6))


def test_bad_exit_weights():
    with pytest.raises(soft.ExitError, match="2 exit weights for 3 exits"):
        soft.resolve_exit_weights([1, 1], (1, 2, 3))
    with pytest.raises(soft.ExitError, match="non-negative"):
        soft.resolve_exit_weights([1, -1], (1, 2))


def test_row_chunks_budget_is_independent_of_exit_count():
    from sorted_jax.objective.exit_loss import RowChunks, row_chunks

    # One exit: two chunks of 4096 rows; four exits share the budget: 8 chunks of 1024.
    assert row_chunks(8 * 1024, 1, 4096) == RowChunks(rows=4096, chunks=2)
    assert row_chunks(8 * 1024, 4, 4096) == RowChunks(rows=1024, chunks=8)
    # Rows per exit shrink as exits grow: K x rows stays within the budget, all rows covered.
    for k in (1, 2, 3, 4, 6):
        plan = row_chunks(8 * 1024, k, 4096)
        assert k * plan.rows <= 4096 and plan.rows * plan.chunks >= 8 * 1024
        assert (plan.rows - 1) * plan.chunks < 8 * 1024  # balanced: no chunk mostly padding
    # A prime number of rows never degrades to one-row chunks: balanced, nearly all useful.
    plan = row_chunks(2039, 1, 512)
    assert plan.chunks == 4 and plan.rows == 510 and plan.rows * plan.chunks - 2039 < 4
    # A budget below one row per exit is an error, not a silent overrun.
    with pytest.raises(ValueError, match="smaller than the number of exits"):
        row_chunks(64, 4, 3)
