"""The building blocks of a LLaMA layer and of the model's two ends, in Flax linen.

A layer is pre-norm attention (rotary positions, grouped-query heads, an optional KV cache)
then a SwiGLU MLP; the model's ends are the embedding lookup and the (untied) LM head. Layouts
follow Hugging Face so its weights load with transposes only: rotate-half rotary, q/k/v
kernels `[embed, heads, head_dim]`, o_proj `[heads, head_dim, embed]`. How the layers stack,
scan and hand out the exits is `sorted_jax.model.modeling`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from sorted_jax.model import lora
from sorted_jax.model.blockwise_attention import causal_attention
from sorted_jax.model.config import LlamaConfig, rope_inv_freq
from sorted_jax.model.kv_cache import write_kv
from sorted_jax.model.lora import LoraSpec
from sorted_jax.parallel import sharding

Array = jax.Array
Dtype = Any

# Logical axis names of activations. Parameters use `embed`, `mlp`, `heads`, `kv_heads`,
# `head_dim`, `vocab`, `layers`; activations get their own names so the rules table can shard
# a weight's embed axis over `fsdp` without also sharding the residual stream's features.
BATCH, LENGTH = "batch", "length"
ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = (
    "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")


DTYPES_BY_NAME = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def normal_init(std: float, names: tuple[str, ...]) -> Callable[..., Array]:
    """A normal(std) initialiser whose parameter carries the logical axis `names`."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as HF does), scaled in the compute dtype."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale, self.eps, self.dtype)


def rms_norm(x: Array, scale: Array, eps: float, dtype: Dtype) -> Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * normed.astype(dtype)


def rotary_cos_sin(positions: Array, config: LlamaConfig) -> tuple[Array, Array]:
    """cos/sin tables `[B, T, head_dim]` in fp32 for HF's rotate-half layout."""
    inv_freq = jnp.asarray(np.asarray(rope_inv_freq(config), np.float32))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x `[B, T, H, Dh]`; rotates (x1, x2) halves as HF's `rotate_half` does."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class Projection(nn.Module):
    """A bias-free einsum projection whose kernel keeps its natural (multi-dim) shape.

    `nn.DenseGeneral` initialises a flat kernel and reshapes it, which breaks logical-axis
    constraints under a mesh; a kernel created in its final shape carries its names cleanly.
    With `lora` the kernel is a frozen base weight (`lora.frozen_einsum`; stored as codes +
    scales when the base is quantised) and, when `target` is one of the spec's targets, the
    projection adds the low-rank update `(x @ A) @ B * alpha / r` (`sorted_jax.model.lora`).
    """

    shape: tuple[int, ...]
    equation: str
    names: tuple[str, ...]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: LoraSpec | None = None
    target: str = ""  # this projection's LoRA target name (q, k, v, o, gate, up, down)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x.astype(self.dtype)
        spec = self.lora
        if spec is None:
            kernel = self.param("kernel", normal_init(0.02, self.names), self.shape,
                                self.param_dtype)
            return jnp.einsum(self.equation, x, kernel.astype(self.dtype))
        axis = self.names.index("embed")
        if self.has_variable("params", lora.KERNEL_Q):  # a quantised base
            parts = (self.get_variable("params", lora.KERNEL_Q),
                     self.get_variable("params", lora.KERNEL_SCALE))
            kind = spec.base_dtype
        else:
            parts = (self.param("kernel", normal_init(0.02, self.names), self.shape,
                                self.param_dtype),)
            kind = None
        y = lora.frozen_einsum(self.equation, x, parts, kind, axis)
        if self.target not in spec.targets:
            return y
        eq_a, eq_b, n_in = lora.adapter_equations(self.equation)
        r, adt = spec.rank, DTYPES_BY_NAME[spec.adapter_dtype]
        a = self.param(lora.LORA_A, lora.kaiming_uniform_a((*self.names[:n_in], lora.RANK_AXIS)),
                       (*self.shape[:n_in], r), adt)
        b = self.param(lora.LORA_B, nn.with_logical_partitioning(
            nn.initializers.zeros, (lora.RANK_AXIS, *self.names[n_in:])),
            (r, *self.shape[n_in:]), adt)
        if spec.dropout > 0 and self.has_rng("dropout"):  # training: the step gives the rng
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
        low = jnp.einsum(eq_a, x, a.astype(self.dtype))
        return y + (jnp.einsum(eq_b, low, b.astype(self.dtype)) * spec.scaling).astype(y.dtype)


@flax.struct.dataclass
class AttentionInputs:
    """What every layer's attention shares: computed once, broadcast through the scan."""

    cos: Array
    sin: Array
    mask: Array | None  # [B, 1, T, S] bool, or None for the causal + lengths fast path
    kv_lengths: Array | None  # [B] int32 (fast path only)
    cache_index: Array | None  # [] or [B] int32 when decoding with a cache
    # packed rows for the blockwise path (no cache, no `mask`): tokens attend earlier valid
    # tokens of their own segment
    segment_ids: Array | None = None  # [B, T] int32
    kv_valid: Array | None = None  # [B, T] bool


def cached_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Attention of `q [B, T, N, Dh]` over one layer's cache `k, v [B, K, S, Dh]` under
    `mask [B, 1, T, S]`: XLA's reference arithmetic (fp32 scores and softmax, probabilities in
    the cache dtype), with the G = N / K query heads of a KV head folded into its query rows
    so both dots read the cache as laid out (no per-step transpose of the cache)."""
    b, t, n, dh = q.shape
    kv = k.shape[1]
    g = n // kv
    qg = q.reshape(b, t, kv, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, dh)
    precision = (jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16
                 else None)
    scores = jnp.einsum("bkqh,bksh->bkqs", qg, k, precision=precision,
                        preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(1.0 / np.sqrt(dh))
    m = jnp.broadcast_to(mask[:, :, None], (b, 1, g, t, mask.shape[-1])).reshape(
        b, 1, g * t, mask.shape[-1])
    scores = jnp.where(m, scores, jnp.float32(-0.7 * np.finfo(np.float32).max))
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v)
    return out.reshape(b, kv, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, n, dh)


class Attention(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str = "xla"
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x: Array, inputs: AttentionInputs, cache: tuple[Array, Array] | None,
                 layer: Array) -> tuple[Array, tuple[Array, Array] | None]:
        """cache: every layer's (k, v) `[L, B, K, S, Dh]`; this layer writes row `layer`."""
        cfg = self.config
        n, k, dh = cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head

        def proj(name: str, heads: int, head_axis: str) -> Projection:
            return Projection((cfg.hidden_size, heads, dh), "btd,dhk->bthk",
                              ("embed", head_axis, "head_dim"), dtype=self.dtype,
                              param_dtype=self.param_dtype, lora=self.lora,
                              target=lora.TARGET_OF[name], name=name)

        q = proj("q_proj", n, "heads")(x)
        kk = proj("k_proj", k, "kv_heads")(x)
        v = proj("v_proj", k, "kv_heads")(x)
        q = nn.with_logical_constraint(q, (BATCH, LENGTH, ACT_HEADS, "head_dim"))
        kk = nn.with_logical_constraint(kk, (BATCH, LENGTH, ACT_KV_HEADS, "head_dim"))
        v = nn.with_logical_constraint(v, (BATCH, LENGTH, ACT_KV_HEADS, "head_dim"))
        q = checkpoint_name(apply_rotary(q, inputs.cos, inputs.sin), "query_proj")
        kk = checkpoint_name(apply_rotary(kk, inputs.cos, inputs.sin), "key_proj")
        v = checkpoint_name(v, "value_proj")

        impl = self.implementation
        if cache is not None:
            # a shared index writes every row's slots at once; a [B] one, each row at its own
            cache = tuple(write_kv(c, new, inputs.cache_index, layer)
                          for c, new in zip(cache, (kk, v), strict=True))
            kk, v = (jax.lax.dynamic_index_in_dim(c, layer, axis=0, keepdims=False).astype(
                self.dtype) for c in cache)
            out = cached_attention(q, kk, v, inputs.mask)
        elif impl == "blockwise" and inputs.mask is None:  # training, eval
            out = causal_attention(q, kk, v, kv_lengths=inputs.kv_lengths,
                                   kv_valid=inputs.kv_valid, segment_ids=inputs.segment_ids)
        elif inputs.mask is None:
            out = jax.nn.dot_product_attention(
                q, kk, v, is_causal=True, key_value_seq_lengths=inputs.kv_lengths,
                implementation=impl)
        else:  # an explicit mask: XLA's reference (blockwise takes no dense mask)
            out = jax.nn.dot_product_attention(
                q, kk, v, mask=inputs.mask, implementation="xla" if impl == "blockwise" else impl)
        out = nn.with_logical_constraint(out, (BATCH, LENGTH, ACT_HEADS, "head_dim"))
        out = Projection((n, dh, cfg.hidden_size), "bthk,hkd->btd",
                         ("heads", "head_dim", "embed"), dtype=self.dtype,
                         param_dtype=self.param_dtype, lora=self.lora, target="o",
                         name="o_proj")(out)
        return checkpoint_name(out, "attention_out"), cache


def embed_lookup(table: Array, ids: Array, dtype: Dtype) -> Array:
    """`table[ids]` `[B, T, D]`, batch-sharded, with a vocab-sharded table under a mesh.

    GSPMD cannot partition a gather from a table split on vocab (tensor) and embed (fsdp) into
    a batch-split output: it replicates the global batch's embeddings on every device. Here
    each vocab shard looks up the ids it holds (others read 0) and one all-reduce over the
    vocab axis adds the shards, for this device's rows only (Megatron's vocab-parallel
    embedding); the table is gathered over fsdp first, as every FSDP weight is (without a vocab
    split GSPMD would otherwise gather the ids of the whole batch to every device instead).
    """
    vocab_axes = sharding.axes_in_context("vocab", table.shape[0])
    batch_axes = tuple(a for a in sharding.axes_in_context(BATCH, ids.shape[0])
                       if a not in vocab_axes)
    if not vocab_axes and not batch_axes:
        return jnp.take(table, ids, axis=0).astype(dtype)

    def local(tab: Array, idx: Array) -> Array:
        if not vocab_axes:
            return jnp.take(tab, idx, axis=0).astype(dtype)
        offset = jax.lax.axis_index(vocab_axes) * tab.shape[0]
        rel = idx - offset
        inside = (rel >= 0) & (rel < tab.shape[0])
        rows = jnp.take(tab, jnp.clip(rel, 0, tab.shape[0] - 1), axis=0).astype(dtype)
        return jax.lax.psum(jnp.where(inside[..., None], rows, 0), vocab_axes)

    b = batch_axes or None
    return jax.shard_map(local, in_specs=(P(vocab_axes, None), P(b, None)),
                         out_specs=P(b, None, None))(table, ids)


def fp32_logits(x: Array, kernel: Array) -> Array:
    """x `[..., D]` @ kernel `[D, V]` in x's dtype, accumulated and returned in fp32."""
    return jnp.einsum("...d,dv->...v", x, kernel.astype(x.dtype),
                      preferred_element_type=jnp.float32)


class LMHead(nn.Module):
    """The untied output projection `[embed, vocab]` (params laid out as `nn.Dense`'s)."""

    vocab_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", normal_init(0.02, ("embed", "vocab")),
                            (x.shape[-1], self.vocab_size), self.param_dtype)
        return fp32_logits(x.astype(self.dtype), kernel)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config

        def dense(name: str, shape: tuple[int, int], names: tuple[str, str]) -> Projection:
            eq = "btd,df->btf" if names[0] == "embed" else "btf,fd->btd"
            return Projection(shape, eq, names, dtype=self.dtype, param_dtype=self.param_dtype,
                              lora=self.lora, target=lora.TARGET_OF[name], name=name)

        d, f = cfg.hidden_size, cfg.intermediate_size
        gate = dense("gate_proj", (d, f), ("embed", "mlp"))(x)
        up = dense("up_proj", (d, f), ("embed", "mlp"))(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, (BATCH, LENGTH, ACT_MLP))
        out = dense("down_proj", (f, d), ("mlp", "embed"))(h)
        return checkpoint_name(out, "mlp_out")
