"""Our Flax LLaMA against the real HF PyTorch `LlamaForCausalLM` (CPU, fp32)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_llama
from helpers import GQA_3L

from sorted_jax.model import hf_mapping, kv_cache, modeling
from sorted_jax.model.config import LlamaConfig

# With head_dim 16 and rope_theta 500000 these put rotary frequencies in all three llama3 bands
# (wavelength < 8: kept, 8..64: smoothed, > 64: divided by `factor`), so the HF parity tests
# below see each band's formula (test_llama3_test_config_covers_all_three_bands checks it).
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 8.0, "original_max_position_embeddings": 64}


def rel_err(ours, ref, valid=None) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if valid is not None:
        ours, ref = ours[valid], ref[valid]
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def hf_exit_logits(hf, ids, mask, positions=None) -> list[np.ndarray]:
    """Logits of every exit n = 1..L from HF: its own final norm + lm_head on hidden_states[n].

    HF's last hidden state is already normed, so exit L uses HF's own logits.
    """
    with torch.no_grad():
        kw = {"attention_mask": torch.tensor(mask, dtype=torch.long)}
        if positions is not None:
            kw["position_ids"] = torch.tensor(positions, dtype=torch.long)
        out = hf(torch.tensor(ids), output_hidden_states=True, **kw)
        n_layers = len(out.hidden_states) - 1
        exits = [hf.lm_head(hf.model.norm(out.hidden_states[n])).numpy()
                 for n in range(1, n_layers)]
    return [*exits, out.logits.numpy()]


def our_exit_logits(model, params, ids, mask, positions=None) -> list[np.ndarray]:
    out = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                      positions=None if positions is None else jnp.asarray(positions))
    logits = model.apply({"params": params}, out.hidden, method=model.head)
    return list(np.asarray(logits))


def right_padded_batch(cfg: LlamaConfig, seed: int = 0, lengths=(12, 9, 5)):
    rng = np.random.RandomState(seed)
    t = max(lengths)
    ids = rng.randint(0, cfg.vocab_size, (len(lengths), t))
    mask = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    return ids, mask


GRID = list(itertools.product([4, 2, 1], [False, True], ["default", "llama3"]))


@pytest.mark.parametrize("kv_heads,tied,rope", GRID,
                         ids=[f"kv{k}-{'tied' if t else 'untied'}-{r}" for k, t, r in GRID])
def test_every_exit_matches_hf(kv_heads, tied, rope):
    rope_kw = ({} if rope == "default"
               else {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING})
    cfg = GQA_3L.replace(num_key_value_heads=kv_heads, tie_word_embeddings=tied, **rope_kw)
    hf = make_hf_llama(cfg, seed=kv_heads)
    params = hf_mapping.hf_to_params(hf.state_dict(), cfg)
    ids, mask = right_padded_batch(cfg)
    ref = hf_exit_logits(hf, ids, mask)
    ours = our_exit_logits(modeling.make_model(cfg), params, ids, mask)
    assert len(ours) == len(ref) == cfg.num_hidden_layers
    for n, (o, r) in enumerate(zip(ours, ref, strict=True), start=1):
        assert rel_err(o, r, mask) < 1e-4, f"exit {n}"


def test_llama3_test_config_covers_all_three_bands():
    import math

    from sorted_jax.model.config import rope_inv_freq

    cfg = GQA_3L.replace(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    base = GQA_3L.replace(rope_theta=500000.0)
    wavelengths = [2 * math.pi / f for f in rope_inv_freq(base)]
    high = 64 / LLAMA3_SCALING["high_freq_factor"]
    bands = {"kept" if w < high else "scaled" if w > 64 else "smoothed" for w in wavelengths}
    assert bands == {"kept", "smoothed", "scaled"}
    # ...and each band's frequencies really change as its formula says.
    for w, f, g in zip(wavelengths, rope_inv_freq(base), rope_inv_freq(cfg), strict=True):
        if w < high:
            assert g == f
        elif w > 64:
            assert g == pytest.approx(f / 8)
        else:
            assert f / 8 < g < f


def test_left_padding_with_explicit_positions_matches_hf():
    """The general mask path: left padding, positions counted from each row's first token."""
    cfg = GQA_3L.replace(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    hf = make_hf_llama(cfg, seed=3)
    params = hf_mapping.hf_to_params(hf.state_dict(), cfg)
    ids, right_mask = right_padded_batch(cfg, seed=1)
    mask = right_mask[:, ::-1].copy()
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = hf_exit_logits(hf, ids, mask, positions)
    ours = our_exit_logits(modeling.make_model(cfg), params, ids, mask, positions)
    for n, (o, r) in enumerate(zip(ours, ref, strict=True), start=1):
        assert rel_err(o, r, mask) < 1e-4, f"exit {n}"


def test_packed_segments_equal_separate_sequences():
    """Two sequences packed in one row with segment ids give each one's unpacked output."""
    cfg = GQA_3L
    model = modeling.make_model(cfg)
    params = modeling.init_params(model, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    a, b = rng.randint(0, cfg.vocab_size, 7), rng.randint(0, cfg.vocab_size, 5)
    packed = np.concatenate([a, b])[None]
    segments = np.array([[1] * 7 + [2] * 5])
    positions = np.array([list(range(7)) + list(range(5))])
    out = model.apply({"params": params}, jnp.asarray(packed), positions=jnp.asarray(positions),
                      segment_ids=jnp.asarray(segments)).hidden
    alone_a = model.apply({"params": params}, jnp.asarray(a[None])).hidden
    alone_b = model.apply({"params": params}, jnp.asarray(b[None])).hidden
    np.testing.assert_allclose(out[:, :, :7], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, :, 7:], alone_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_roundtrip_is_bitwise(tied):
    cfg = GQA_3L.replace(num_key_value_heads=1, tie_word_embeddings=tied)
    hf = make_hf_llama(cfg, seed=5)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = hf_mapping.params_to_hf(hf_mapping.hf_to_params(state, cfg), cfg,
                                   include_tied_head=tied)
    assert set(back) == set(state)
    for name, w in state.items():
        assert back[name].dtype == w.dtype and np.array_equal(back[name], w), name


def test_mapping_rejects_mismatched_state_dict():
    cfg = GQA_3L
    state = {k: v.numpy() for k, v in make_hf_llama(cfg).state_dict().items()}
    with pytest.raises(hf_mapping.MappingError, match="missing"):
        hf_mapping.hf_to_params({k: v for k, v in state.items() if "layers.1.mlp" not in k}, cfg)
    bad = dict(state)
    bad["model.layers.0.self_attn.k_proj.weight"] = np.zeros((7, 64), np.float32)
    with pytest.raises(hf_mapping.MappingError, match="k_proj.*shape"):
        hf_mapping.hf_to_params(bad, cfg)
    with pytest.raises(hf_mapping.MappingError, match="unexpected"):
        hf_mapping.hf_to_params({**state, "model.layers.0.extra.weight": np.zeros(3)}, cfg)


def test_submodel_of_every_depth_equals_truncated_full_model():
    cfg = GQA_3L.replace(num_hidden_layers=5)
    model = modeling.make_model(cfg)
    params = modeling.init_params(model, jax.random.PRNGKey(1))
    ids, mask = right_padded_batch(cfg)
    full = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    for k in range(1, cfg.num_hidden_layers + 1):
        sub = modeling.make_model(cfg.submodel(k))
        sub_params = modeling.slice_layers(params, 0, k)
        assert jax.tree.leaves(sub_params["layers"])[0].shape[0] == k
        out = sub.apply({"params": sub_params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
        assert out.hidden.shape[0] == k
        np.testing.assert_allclose(out.hidden, full.hidden[:k], rtol=1e-6, atol=1e-6)


def test_submodel_costs_k_layers_of_compute():
    """XLA's FLOP count of a depth-k forward grows with k (scan of length k, not L)."""
    cfg = GQA_3L.replace(num_hidden_layers=8)
    params = modeling.init_params(modeling.make_model(cfg), jax.random.PRNGKey(0))
    ids = jnp.zeros((1, 16), jnp.int32)

    def flops(k: int) -> float:
        # Unrolled scan so the cost analysis sees every layer (it counts a loop body once).
        sub = modeling.make_model(cfg.submodel(k), scan_unroll=k)
        fn = jax.jit(lambda p, i: sub.apply({"params": p}, i).hidden)
        return fn.lower(modeling.slice_layers(params, 0, k), ids).compile().cost_analysis()[
            "flops"]

    f2, f4, f8 = flops(2), flops(4), flops(8)
    assert f4 == pytest.approx(2 * f2, rel=0.05) and f8 == pytest.approx(4 * f2, rel=0.05)


@pytest.mark.parametrize("policy", ["full", "dots_with_no_batch_dims_saveable",
                                    "save_qkv_and_out_proj"])
def test_remat_gives_same_output_and_gradient(policy):
    cfg = GQA_3L
    plain = modeling.make_model(cfg)
    remat = modeling.make_model(cfg, remat_policy=policy)
    params = modeling.init_params(plain, jax.random.PRNGKey(2))
    ids, mask = right_padded_batch(cfg)

    def loss(model, p):
        h = model.apply({"params": p}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).hidden
        return jnp.sum(model.apply({"params": p}, h, method=model.head) ** 2) * 1e-3

    l0, g0 = jax.value_and_grad(lambda p: loss(plain, p))(params)
    l1, g1 = jax.value_and_grad(lambda p: loss(remat, p))(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_compute_stays_close_to_fp32():
    cfg = GQA_3L
    hf = make_hf_llama(cfg, seed=7)
    params = hf_mapping.hf_to_params(hf.state_dict(), cfg)
    ids, mask = right_padded_batch(cfg)
    ref = our_exit_logits(modeling.make_model(cfg), params, ids, mask)
    low = our_exit_logits(modeling.make_model(cfg, dtype=jnp.bfloat16), params, ids, mask)
    for o, r in zip(low, ref, strict=True):
        # Logits accumulate and come out in fp32 (not rounded to bf16), as the loss computes.
        assert o.dtype == np.float32
        rounded = np.asarray(jnp.asarray(o).astype(jnp.bfloat16).astype(jnp.float32))
        assert np.mean(rounded != o) > 0.5
        assert rel_err(o, r, mask) < 3e-2
        # The argmax mostly agrees: bf16 noise, not a different model.
        assert np.mean(o.argmax(-1)[mask] == r.argmax(-1)[mask]) > 0.9


def test_params_carry_logical_axis_names():
    cfg = GQA_3L
    specs = modeling.logical_axes(modeling.make_model(cfg))
    layer = specs["layers"]
    assert tuple(specs["embed_tokens"]["embedding"]) == ("vocab", "embed")
    assert tuple(layer["self_attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads",
                                                              "head_dim")
    assert tuple(layer["self_attn"]["k_proj"]["kernel"]) == ("layers", "embed", "kv_heads",
                                                              "head_dim")
    assert tuple(layer["self_attn"]["o_proj"]["kernel"]) == ("layers", "heads", "head_dim",
                                                              "embed")
    assert tuple(layer["mlp"]["down_proj"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
    shapes = jax.tree.map(lambda x: x.shape, modeling.init_params(
        modeling.make_model(cfg), jax.random.PRNGKey(0)))
    assert shapes["layers"]["self_attn"]["q_proj"]["kernel"] == (3, 64, 4, 16)


def test_kv_cache_prefill_then_step_equals_full_forward():
    """The cache threads through the same scan: chunked prefill + decode == one forward."""
    cfg = GQA_3L
    model = modeling.make_model(cfg)
    params = modeling.init_params(model, jax.random.PRNGKey(3))
    ids = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 10))
    full = model.apply({"params": params}, jnp.asarray(ids)).hidden
    cache = kv_cache.KVCache.init(cfg, batch=2, max_len=16, dtype=jnp.float32)
    pos = np.broadcast_to(np.arange(10), (2, 10))
    hidden = []
    for lo, hi in [(0, 6), (6, 7), (7, 10)]:
        out = model.apply({"params": params}, jnp.asarray(ids[:, lo:hi]),
                          positions=jnp.asarray(pos[:, lo:hi]), cache=cache)
        cache = out.cache
        hidden.append(out.hidden)
    np.testing.assert_allclose(jnp.concatenate(hidden, axis=2), full, rtol=1e-5, atol=1e-5)
    assert int(cache.index) == 10
