"""LoRA / QLoRA on the scanned trunk: the base reproduced at step 0, the quantiser, the merge,
and the real step's adapter gradients against `jax.grad` of a naive LoRA model on every mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_batch, random_params

from sorted_jax.model import lora, modeling, quant
from sorted_jax.model.config import ConfigError, LlamaConfig
from sorted_jax.model.lora import LoraSpec
from sorted_jax.parallel import sharding
from sorted_jax.training import train_step

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2)
EXITS = (2, 3, 4)
WEIGHTS = np.array([0.2, 0.3, 0.5], np.float32)
LR = 1024.0


def make_batch(b=8, t=16, seed=0):
    return random_batch(CFG.vocab_size, b, t, seed)


def lora_params(spec, seed=0, trained=True):
    """A random base plus adapters: fresh ones (B = 0) or 'trained' ones (B != 0)."""
    model = modeling.make_model(CFG, lora=spec)
    fresh = modeling.init_params(model, jax.random.PRNGKey(seed))
    adapters = lora.split_tree(fresh, lora.is_adapter)[0]
    if trained:
        leaves, tree = jax.tree.flatten(adapters)
        keys = jax.random.split(jax.random.PRNGKey(seed + 7), len(leaves))
        adapters = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                             for x, k in zip(leaves, keys, strict=True)])
    return lora.merge_trees(random_params(CFG, seed, as_jax=True), adapters)


def all_exit_logits(model, params, batch):
    ids, attn = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    hidden = model.apply({"params": params}, ids, attention_mask=attn).hidden  # every layer
    return model.apply({"params": params}, hidden, method=model.head)


def dequantised(params, kind):
    """The base as a quantised run holds it, back in fp32 (the naive reference's weights)."""
    def walk(t, path):
        out = {}
        for k, v in t.items():
            p = (*path, k)
            if isinstance(v, dict):
                out[k] = walk(v, p)
            elif lora.quantised_kernel_path(p):
                axis = lora.EMBED_AXIS[p[-2]] + 1
                q, s = quant.quantise(v, axis, kind)
                out[k] = quant.dequantise(q, s, axis, kind, jnp.float32)
            else:
                out[k] = v
        return out

    return walk(params, ())


def test_spec_checks():
    assert LoraSpec(rank=8, alpha=16).scaling == 2.0
    for bad, match in (({"rank": -1}, "rank"), ({"rank": 4, "alpha": 0.0}, "alpha"),
                       ({"rank": 4, "targets": ("q", "x")}, "unknown: x"),
                       ({"rank": 4, "base_dtype": "fp8"}, "base_dtype"),
                       ({"rank": 4, "dropout": 1.0}, "dropout")):
        with pytest.raises(ConfigError, match=match):
            LoraSpec(**bad)
    with pytest.raises(ConfigError, match="multiple of the quantisation block"):
        lora.check_model(LoraSpec(rank=4, base_dtype="nf4"), 96)
    lora.check_model(LoraSpec(rank=4, base_dtype="nf4"), 128)
    lora.check_model(LoraSpec(rank=4, base_dtype="bfloat16"), 96)  # only quantising blocks
    spec = LoraSpec(rank=4, targets=("q", "down"), base_dtype="nf4", train_norms=True)
    assert LoraSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("kind,bound", [("int8", 0.01), ("int4", 0.15), ("nf4", 0.12)])
def test_quantise_blocks_pack_and_round_trip(kind, bound):
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 128, 4, 16))  # blocked along axis 1
    q, s = quant.quantise(w, 1, kind)
    assert (q.shape, s.shape) == quant.stored_shapes(w.shape, 1, kind)
    assert q.dtype == quant.codes_dtype(kind) and s.shape == (3, 2, 4, 16)
    back = quant.dequantise(q, s, 1, kind, jnp.float32)
    rel = float(jnp.linalg.norm(back - w) / jnp.linalg.norm(w))
    assert rel < bound, rel
    # every block's absmax is exact (the codebooks hold +-1), and 0 stays 0
    blocks = np.asarray(back).reshape(3, 2, 64, 4, 16)
    np.testing.assert_allclose(np.abs(blocks).max(2), np.asarray(s), rtol=1e-6)
    zero = quant.dequantise(*quant.quantise(jnp.zeros((128, 2)), 0, kind), 0, kind, jnp.float32)
    assert not np.any(np.asarray(zero))
    if kind == "nf4":  # values already on the codebook come back exactly
        codes = np.random.RandomState(0).randint(0, 16, (64, 3))
        codes[0] = 15  # the absmax of each column is the level 1.0
        x = quant.NF4[codes] * 0.5
        np.testing.assert_array_equal(
            quant.dequantise(*quant.quantise(x, 0, kind), 0, kind, jnp.float32), x)
    assert quant.bits_per_value(kind) == (8.5 if kind == "int8" else 4.5)


@pytest.mark.parametrize("base_dtype", ["float32", "nf4"])
def test_fresh_adapters_reproduce_the_base_at_every_exit(base_dtype):
    """B = 0 at init: the LoRA model's logits at every exit are the base model's (the
    dequantised base for a quantised one), fp32, to 1e-6."""
    spec = LoraSpec(rank=4, alpha=8, base_dtype=base_dtype)
    params = lora_params(spec, trained=False)
    steps = train_step.SoftSteps(modeling.make_model(CFG, lora=spec), EXITS, optax.sgd(1.0),
                                 sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    state = steps.state_from_params(params)  # the base quantised where the spec says
    full = lora.merge_trees(steps.frozen_params, state.params)
    b = make_batch()
    got = all_exit_logits(modeling.make_model(CFG, lora=spec), full, b)
    base = lora.split_tree(params, lora.is_adapter)[1]
    if spec.quantised:
        base = dequantised(base, base_dtype)
    want = all_exit_logits(modeling.make_model(CFG), base, b)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if spec.quantised:  # and the quantised base is not the float one
        float_logits = all_exit_logits(modeling.make_model(CFG), lora.split_tree(
            params, lora.is_adapter)[1], b)
        assert float(jnp.max(jnp.abs(got - float_logits))) > 1e-3


@pytest.mark.parametrize("base_dtype", ["float32", "int8"])
def test_merge_is_the_trained_model(base_dtype):
    """The merged plain params (what every command loads) give the LoRA model's logits."""
    spec = LoraSpec(rank=4, alpha=8, base_dtype=base_dtype, train_norms=True)
    params = lora_params(spec, seed=3)
    trained, frozen = lora.split_tree(params, lora.trainable(spec))
    assert "norm" in trained and "scale" in trained["layers"]["input_layernorm"]
    trained["norm"]["scale"] = trained["norm"]["scale"] * 1.5  # a trained norm is merged in
    held = lora.merge_trees(lora.quantise_base(frozen, spec), trained)
    b = make_batch(seed=4)
    want = all_exit_logits(modeling.make_model(CFG, lora=spec), held, b)
    merged = lora.merge(jax.tree.map(np.asarray, frozen), jax.tree.map(np.asarray, trained), spec)
    assert not lora.has_adapters(merged)
    got = all_exit_logits(modeling.make_model(CFG), jax.tree.map(jnp.asarray, merged), b)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def naive_loss(adapters, base, spec, batch):
    """jax.grad reference: the kernels W + (alpha / r) A @ B materialised, a plain model, every
    exit's [B, T, V] log-softmax, the weighted mean of the exits' cross-entropies."""
    def merged(t, path):
        out = {}
        for k, v in t.items():
            p = (*path, k)
            if isinstance(v, dict):
                out[k] = merged(v, p)
            elif lora.quantised_kernel_path(p) and lora.TARGET_OF[p[-2]] in spec.targets:
                ad = adapters["layers"][p[1]][p[2]]
                a, b = ad[lora.LORA_A], ad[lora.LORA_B]
                r = a.shape[-1]
                d = jnp.matmul(a.reshape(a.shape[0], -1, r), b.reshape(b.shape[0], r, -1))
                out[k] = v + spec.scaling * d.reshape(v.shape)
            else:
                out[k] = v
        return out

    # trained norms (train_norms) replace the base's
    params = lora.merge_trees(merged(base, ()), lora.split_tree(adapters, lora.is_norm)[0])
    model = modeling.make_model(CFG)
    ids, attn = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    hidden = model.apply({"params": params}, ids, attention_mask=attn).hidden
    logp = jax.nn.log_softmax(model.apply({"params": params}, hidden[np.asarray(EXITS) - 1],
                                          method=model.head))
    targets, mask = jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_mask"])
    ce = -jnp.take_along_axis(logp, targets[None, ..., None], -1)[..., 0]
    return jnp.sum(jnp.asarray(WEIGHTS) * jnp.sum(ce * mask, axis=(1, 2)) / jnp.sum(mask))


@pytest.mark.parametrize("mesh_shape,grad_accum,base_dtype,train_norms", [
    ((1, 1, 1), 1, "float32", False),
    ((8, 1, 1), 2, "float32", False),
    ((1, 8, 1), 2, "nf4", False),
    ((2, 2, 2), 2, "float32", True),
])
def test_adapter_gradients_of_the_real_step_equal_the_naive_lora_model(
        mesh_shape, grad_accum, base_dtype, train_norms):
    n = int(np.prod(mesh_shape))
    if len(jax.devices()) < n:
        pytest.skip("needs 8 fake CPU devices (conftest sets XLA_FLAGS)")
    spec = LoraSpec(rank=4, alpha=8, base_dtype=base_dtype, train_norms=train_norms,
                    targets=lora.TARGETS if n == 1 else ("q", "v", "o", "gate", "down"))
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:n])
    steps = train_step.SoftSteps(modeling.make_model(CFG, lora=spec), exits=EXITS,
                                 tx=optax.sgd(LR), mesh=mesh, exit_weights=list(WEIGHTS),
                                 grad_accum=grad_accum, rows_per_chunk=32)
    params = lora_params(spec, seed=1)
    state = steps.state_from_params(params)
    frozen_before = jax.tree.map(np.asarray, steps.frozen_params)
    before = jax.tree.map(np.asarray, state.params)
    assert not lora.split_tree(before, lambda p: not lora.trainable(spec)(p))[0]  # adapters
    batch = make_batch(seed=5)
    state, _ = steps.train_step(state, train_step.to_global_batch(batch, steps.batch_shardings))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(frozen_before),
                            jax.tree.leaves(steps.frozen_params), strict=True):
        assert np.array_equal(x, np.asarray(y)), f"base {jax.tree_util.keystr(path)} changed"
    grads = jax.tree.map(lambda a, b: (a - b) / LR, before, jax.tree.map(np.asarray,
                                                                           state.params))
    base = lora.split_tree(params, lora.trainable(spec))[1]
    if spec.quantised:
        base = dequantised(base, base_dtype)
    ref = jax.grad(naive_loss)(jax.tree.map(jnp.asarray, before), base, spec, batch)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref),
                            strict=True):
        err = np.linalg.norm(g - np.asarray(r)) / np.linalg.norm(np.asarray(r))
        assert err < 1e-3, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"
