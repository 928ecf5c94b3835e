"""The blockwise attention (`sorted_jax.model.blockwise_attention`) against XLA's reference
`jax.nn.dot_product_attention`, in value and gradient (fp32): causal with right padding, packed
segments, grouped-query and multi-head, blocks that do and do not divide the length; then the
whole model and train step with it, and what it saves (no `[B, H, T, T]` array)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sorted_jax.model import modeling
from sorted_jax.model.blockwise_attention import causal_attention
from sorted_jax.model.config import LlamaConfig

T = 37
LENGTHS = np.asarray([37, 23, 1])
# row 0: two segments then padding; row 1: three segments; row 2: one segment, then padding
SEGMENTS = np.asarray([[1] * 15 + [2] * 18 + [0] * 4,
                       [1] * 7 + [2] * 7 + [3] * 23,
                       [1] * 30 + [0] * 7])
BLOCKS = [dict(), dict(block=8, key_chunk=16), dict(block=16, key_chunk=8),
          dict(block=7, key_chunk=13), dict(block=64, key_chunk=64)]


def _qkv(heads: int, kv_heads: int, seed: int = 0):
    r = np.random.RandomState(seed)
    shape_q, shape_kv = (3, T, heads, 8), (3, T, kv_heads, 8)
    q, k, v, w = (jnp.asarray(r.randn(*s), jnp.float32)
                  for s in (shape_q, shape_kv, shape_kv, shape_q))
    return q, k, v, w


def _reference(q, k, v, case):
    if case == "padded":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                            key_value_seq_lengths=jnp.asarray(LENGTHS))
    seg = jnp.asarray(SEGMENTS)
    i = jnp.arange(T)
    mask = ((i[None, :] <= i[:, None])[None] & (seg[:, :, None] == seg[:, None, :])
            & (seg > 0)[:, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


def _blockwise(q, k, v, case, **kw):
    if case == "padded":
        return causal_attention(q, k, v, kv_lengths=jnp.asarray(LENGTHS), **kw)
    seg = jnp.asarray(SEGMENTS)
    return causal_attention(q, k, v, segment_ids=seg, kv_valid=seg > 0, **kw)


def _rows(case):
    """Queries that see at least one key (the others' output reaches no loss)."""
    if case == "padded":
        return np.arange(T)[None] < LENGTHS[:, None]
    return SEGMENTS > 0


@pytest.mark.parametrize("case", ["padded", "packed"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)], ids=["gqa", "mha", "mqa"])
def test_value_and_gradient_equal_the_reference(case, heads, kv_heads):
    q, k, v, w = _qkv(heads, kv_heads)
    rows = jnp.asarray(_rows(case))[..., None, None]

    def loss(fn, **kw):
        return lambda q, k, v: jnp.sum(jnp.where(rows, fn(q, k, v, case, **kw) * w, 0.0))

    ref = _reference(q, k, v, case)
    ref_grads = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    for kw in BLOCKS:
        out = _blockwise(q, k, v, case, **kw)
        np.testing.assert_allclose(np.where(rows, out, 0), np.where(rows, ref, 0), atol=2e-6,
                                   err_msg=str(kw))
        grads = jax.grad(loss(_blockwise, **kw), argnums=(0, 1, 2))(q, k, v)
        for name, g, r in zip("qkv", grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=f"d{name} {kw}")


def test_bfloat16_inputs_keep_their_dtype_and_stay_close():
    q, k, v, _ = _qkv(4, 2, seed=1)
    ref = _reference(q, k, v, "padded")
    out = _blockwise(*(x.astype(jnp.bfloat16) for x in (q, k, v)), "padded", block=8)
    assert out.dtype == jnp.bfloat16
    rows = _rows("padded")[..., None, None]
    assert float(jnp.max(jnp.abs(jnp.where(rows, out.astype(jnp.float32) - ref, 0)))) < 0.05


def test_shapes_are_checked():
    q, k, v, _ = _qkv(4, 3)
    with pytest.raises(ValueError, match="K dividing N"):
        causal_attention(q, k, v)


CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _model_loss(impl: str, batch: dict):
    model = modeling.make_model(CFG, attention_impl=impl)
    params = modeling.init_params(model, jax.random.PRNGKey(0))

    def loss(p):
        out = model.apply({"params": p}, batch["ids"], attention_mask=batch["mask"],
                          segment_ids=batch.get("segments"), positions=batch.get("positions"))
        logits = model.apply({"params": p}, out.hidden[-1], method=model.head)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(ce * batch["mask"])

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("case", ["padded", "packed"])
def test_the_model_trains_the_same_with_either_attention(case):
    r = np.random.RandomState(3)
    ids = jnp.asarray(r.randint(0, CFG.vocab_size, (3, T)))
    batch = {"ids": ids, "targets": jnp.roll(ids, -1, axis=1)}
    if case == "padded":
        batch["mask"] = jnp.asarray(_rows("padded"))
    else:
        seg = SEGMENTS
        pos = np.zeros_like(seg)
        for b in range(seg.shape[0]):
            for s in set(seg[b]) - {0}:
                where = np.nonzero(seg[b] == s)[0]
                pos[b, where] = np.arange(len(where))
        batch.update(mask=jnp.asarray(seg > 0), segments=jnp.asarray(seg),
                     positions=jnp.asarray(pos))
    ref_loss, ref_grads = _model_loss("xla", batch)
    loss, grads = _model_loss("blockwise", batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_auto_is_blockwise_on_cpu_and_explicit_choices_stand():
    """`auto` takes the blockwise attention on CPU (a same-run A/B measured it faster there)."""
    assert jax.default_backend() == "cpu"
    assert modeling.resolve_attention_impl("auto", jnp.float32) == "blockwise"
    assert modeling.resolve_attention_impl("blockwise", jnp.float32) == "blockwise"
    assert modeling.resolve_attention_impl("xla", jnp.float32) == "xla"
    with pytest.raises(ValueError, match="blockwise"):
        modeling.resolve_attention_impl("flash", jnp.float32)


def _largest_f32_array(impl: str, b: int, t: int) -> int:
    cfg = CFG.replace(max_position_embeddings=t)
    model = modeling.make_model(cfg, attention_impl=impl)
    params = modeling.init_params(model, jax.random.PRNGKey(0))
    ids = jnp.zeros((b, t), jnp.int32)

    def loss(p):
        h = model.apply({"params": p}, ids, attention_mask=jnp.ones((b, t), bool)).hidden[-1]
        return jnp.sum(h ** 2)

    text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
             for dims in re.findall(r"f32\[([0-9,]*)\]", text)]
    return max(sizes)


def test_no_batch_by_heads_by_length_squared_array_is_compiled():
    """XLA's reference keeps `[B, H, T, T]` scores (and a per-layer stack of them for the
    backward pass); the blockwise step's largest array is a fraction of that."""
    b, t = 2, 256
    full = b * CFG.num_attention_heads * t * t
    assert _largest_f32_array("xla", b, t) >= full
    assert _largest_f32_array("blockwise", b, t) <= full // 4
