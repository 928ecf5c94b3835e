"""LLaMA in Flax linen, with the decoder stack under `nn.scan` handing out the exits' states.

SoFT reads the hidden state after each exit layer n (not normed), so the scan carries an
`[K, B, T, D]` buffer of the K requested exits beside its `[B, T, D]` state, and each layer
writes its output into the slot of the next exit at or above it (layers between exits overwrite
the slot; the exit layer writes last). The buffer update is a `dynamic_update_slice`, linear, so
the backward pass keeps no per-layer copy of it: training costs K stacked states (the loss needs
them), not L. SFT (the one exit L) needs no buffer at all: its exit is the scan's final state.
Weights sit on a leading `layers` axis, so the sub-model of depth k is the same params sliced
`[:k]` run by a scan of length k (see `slice_layers`), costing k layers of compute.

Layouts follow Hugging Face so its weights load with transposes only: rotate-half rotary,
q/k/v kernels `[embed, heads, head_dim]`, o_proj `[heads, head_dim, embed]`.

A KV cache (`KVCache`, all layers in one `[L, ...]` buffer) rides in the scan's carry and each
layer updates its own rows in place, so decoding reuses this exact code (no second model) and a
decode step writes only the new tokens' keys and values, not the whole cache. Its write index is
shared by all rows or per row (`[B]`, speculative batches whose rows commit different counts).
Decoding runs segments `[a, b)` of the stack with `run_layer_range`, a loop that reads layer i
of the one stacked copy in place (slicing per segment would copy the weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from sorted_jax.model.config import LlamaConfig, rope_inv_freq
from sorted_jax.parallel import sharding

Array = jax.Array
Dtype = Any

# Logical axis names of activations. Parameters use `embed`, `mlp`, `heads`, `kv_heads`,
# `head_dim`, `vocab`, `layers`; activations get their own names so the rules table can shard
# a weight's embed axis over `fsdp` without also sharding the residual stream's features.
BATCH, LENGTH = "batch", "length"
ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = (
    "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "auto")


def remat_policies() -> dict[str, Callable[..., bool] | None]:
    """Named rematerialisation policies for the scanned layer (`none` = no remat at all)."""
    cp = jax.checkpoint_policies
    return {
        "full": cp.nothing_saveable,
        "nothing_saveable": cp.nothing_saveable,
        "dots_saveable": cp.dots_saveable,
        "dots_with_no_batch_dims_saveable": cp.dots_with_no_batch_dims_saveable,
        # Keep the projections' outputs, recompute the cheap elementwise work and attention.
        "save_qkv_proj": cp.save_only_these_names("query_proj", "key_proj", "value_proj"),
        "save_out_proj": cp.save_only_these_names("attention_out", "mlp_out"),
        "save_qkv_and_out_proj": cp.save_only_these_names(
            "query_proj", "key_proj", "value_proj", "attention_out", "mlp_out"),
    }


REMAT_POLICY_NAMES = ("none", *remat_policies().keys())
# Config names of compute / parameter dtypes (train and evaluate configs).
DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
          "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16}


def resolve_attention_impl(impl: str, dtype: Dtype) -> str:
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        on_gpu = jax.default_backend() == "gpu"
        return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
    return impl


def _init(std: float, names: tuple[str, ...]) -> Callable[..., Array]:
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


# ---------------------------------------------------------------------------------------------
# KV cache


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer for `S` slots, plus each slot's token position per row.

    `positions[b, s]` is the position id of the token stored in slot s of row b, or -1 when the
    slot holds padding or nothing. `index` is the next slot to write: a scalar when all rows
    write the same slots (rows of different lengths then differ only in their positions), or
    `[B]` when every row has its own length (per-row speculative decoding: rows commit
    different numbers of tokens). Rolling back is setting `index` back: attention masks every
    slot at or past its row's `index` (plus the tokens being written), so rejected K/V are
    never attended whatever the slots still hold. Per-row writes past the last slot are
    dropped (a finished row may run on without growing).
    """

    k: Array  # [L, B, S, K, Dh]
    v: Array  # [L, B, S, K, Dh]
    positions: Array  # [B, S] int32
    index: Array  # [] or [B] int32

    @classmethod
    def init(cls, config: LlamaConfig, batch: int, max_len: int,
             dtype: Dtype = jnp.bfloat16, per_row: bool = False) -> KVCache:
        shape = (config.num_hidden_layers, batch, max_len, config.kv_heads, config.dim_per_head)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   positions=jnp.full((batch, max_len), -1, jnp.int32),
                   index=jnp.zeros((batch,) if per_row else (), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def layers(self, start: int, stop: int) -> KVCache:
        return self.replace(k=self.k[start:stop], v=self.v[start:stop])


def write_slots(buf: Array, new: Array, index: Array, layer: Array | int | None = None
                ) -> Array:
    """`buf [B, S, ...]` (or layer `layer` of `buf [L, B, S, ...]`, in place) with
    `new [B, T, ...]` written at slots `index .. index + T - 1`.

    A scalar index is one `dynamic_update_slice` (every row the same slots); a `[B]` index
    scatters each row at its own offset, dropping writes past the last slot (a clamped
    dynamic slice would instead shift them onto live slots).
    """
    new = new.astype(buf.dtype)
    lead = () if layer is None else (layer,)
    if index.ndim == 0:
        zero = jnp.zeros((), jnp.int32)
        start = (*lead, zero, index, *([zero] * (new.ndim - 2)))
        return jax.lax.dynamic_update_slice(buf, new.reshape((1,) * len(lead) + new.shape),
                                            start)
    rows = jnp.arange(new.shape[0])[:, None]
    cols = index[:, None] + jnp.arange(new.shape[1])[None, :]
    return buf.at[(*lead, rows, cols)].set(new, mode="drop")


# ---------------------------------------------------------------------------------------------
# Building blocks


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
    """

    shape: tuple[int, ...]
    equation: str
    names: tuple[str, ...]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", _init(0.02, self.names), self.shape, self.param_dtype)
        return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))


@flax.struct.dataclass
class AttentionInputs:
    """What every layer's attention shares: computed once, broadcast through the scan."""

    cos: Array
    sin: Array
    mask: Array | None  # [B, 1, T, S] bool, or None for the causal + lengths fast path
    kv_lengths: Array | None  # [B] int32 (fast path only)
    cache_index: Array | None  # [] or [B] int32 when decoding with a cache


class Attention(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x: Array, inputs: AttentionInputs, cache: tuple[Array, Array] | None,
                 layer: Array) -> tuple[Array, tuple[Array, Array] | None]:
        """cache: every layer's (k, v) `[L, B, S, K, Dh]`; this layer writes row `layer`."""
        cfg = self.config
        n, k, dh = cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head

        def proj(name: str, heads: int, head_axis: str) -> Projection:
            return Projection((cfg.hidden_size, heads, dh), "btd,dhk->bthk",
                              ("embed", head_axis, "head_dim"), dtype=self.dtype,
                              param_dtype=self.param_dtype, name=name)

        q = proj("q_proj", n, "heads")(x)
        kk = proj("k_proj", k, "kv_heads")(x)
        v = proj("v_proj", k, "kv_heads")(x)
        q = nn.with_logical_constraint(q, (BATCH, LENGTH, ACT_HEADS, "head_dim"))
        kk = nn.with_logical_constraint(kk, (BATCH, LENGTH, ACT_KV_HEADS, "head_dim"))
        v = nn.with_logical_constraint(v, (BATCH, LENGTH, ACT_KV_HEADS, "head_dim"))
        q = checkpoint_name(apply_rotary(q, inputs.cos, inputs.sin), "query_proj")
        kk = checkpoint_name(apply_rotary(kk, inputs.cos, inputs.sin), "key_proj")
        v = checkpoint_name(v, "value_proj")

        if cache is not None:
            # a shared index writes every row's slots at once; a [B] one, each row at its own
            cache = tuple(write_slots(c, new, inputs.cache_index, layer=layer)
                          for c, new in zip(cache, (kk, v), strict=True))
            kk, v = (jax.lax.dynamic_index_in_dim(c, layer, axis=0, keepdims=False).astype(
                self.dtype) for c in cache)

        if inputs.mask is None:
            out = jax.nn.dot_product_attention(
                q, kk, v, is_causal=True, key_value_seq_lengths=inputs.kv_lengths,
                implementation=self.implementation)
        else:
            out = jax.nn.dot_product_attention(q, kk, v, mask=inputs.mask,
                                               implementation=self.implementation)
        out = nn.with_logical_constraint(out, (BATCH, LENGTH, ACT_HEADS, "head_dim"))
        out = Projection((n, dh, cfg.hidden_size), "bthk,hkd->btd",
                         ("heads", "head_dim", "embed"), dtype=self.dtype,
                         param_dtype=self.param_dtype, name="o_proj")(out)
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
        kernel = self.param("kernel", _init(0.02, ("embed", "vocab")),
                            (x.shape[-1], self.vocab_size), self.param_dtype)
        return fp32_logits(x.astype(self.dtype), kernel)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config

        def dense(name: str, features: int, names: tuple[str, str]) -> nn.Dense:
            return nn.Dense(features, use_bias=False, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name,
                            kernel_init=_init(0.02, names))

        gate = dense("gate_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
        up = dense("up_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, (BATCH, LENGTH, ACT_MLP))
        out = dense("down_proj", cfg.hidden_size, ("mlp", "embed"))(h)
        return checkpoint_name(out, "mlp_out")


@flax.struct.dataclass
class LayerInputs:
    """Broadcast to every layer of the scan."""

    attention: AttentionInputs
    exit_slots: Array | None  # [L] int32: the exit buffer slot each layer writes, -1 = none


def _write_exit(buf: Array, h: Array, slots: Array, layer: Array) -> Array:
    """Layer `layer`'s output into its exit slot (the next exit at or above it, if any)."""
    slot = slots[layer]
    slot_c = jnp.maximum(slot, 0)
    current = jax.lax.dynamic_index_in_dim(buf, slot_c, axis=0, keepdims=False)
    value = jnp.where(slot >= 0, h.astype(buf.dtype), current)
    return jax.lax.dynamic_update_index_in_dim(buf, value, slot_c, axis=0)


class DecoderLayer(nn.Module):
    """One pre-norm LLaMA block as a scan body: ((h, cache, layer, exit_buf), inputs) -> carry.

    `exit_buf` `[K, B, T, D]` (or None) collects the exits' hidden states (module docstring).
    """

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, carry: tuple, layer_inputs: LayerInputs) -> tuple[tuple, None]:
        h, cache, layer, exit_buf = carry
        inputs = layer_inputs.attention
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.with_logical_constraint(h, (BATCH, LENGTH, ACT_EMBED))
        attn_out, cache = Attention(cfg, implementation=self.attention_impl, name="self_attn",
                                    **kw)(RMSNorm(cfg.rms_norm_eps, name="input_layernorm",
                                                  **kw)(h), inputs, cache, layer)
        h = h + attn_out
        mlp_out = MLP(cfg, name="mlp", **kw)(
            RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(h))
        h = nn.with_logical_constraint(h + mlp_out, (BATCH, LENGTH, ACT_EMBED))
        if exit_buf is not None:
            exit_buf = nn.with_logical_constraint(
                _write_exit(exit_buf, h, layer_inputs.exit_slots, layer),
                (None, BATCH, LENGTH, ACT_EMBED))
        return (h, cache, layer + 1, exit_buf), None


# ---------------------------------------------------------------------------------------------
# The model


@flax.struct.dataclass
class ModelOutput:
    hidden: Array  # [K, B, T, D]: the hidden state after each exit layer (not normed)
    cache: KVCache | None
    exits: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())  # K layer numbers


def exit_slots(exits: tuple[int, ...], num_layers: int) -> np.ndarray:
    """`[L]` int32: slot of the first exit at or above each layer (0-based), -1 past the last."""
    slots = np.full(num_layers, -1, np.int32)
    for layer in range(num_layers):
        later = [j for j, e in enumerate(exits) if e >= layer + 1]
        if later:
            slots[layer] = later[0]
    return slots


def check_exits(exits: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """Exit layer numbers, strictly increasing in 1..L (None = every layer)."""
    if exits is None:
        return tuple(range(1, num_layers + 1))
    out = tuple(int(e) for e in exits)
    if not out or any(not 1 <= e <= num_layers for e in out) or any(
            a >= b for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"exits must be increasing layer numbers in 1..{num_layers}, got {out}")
    return out


class Llama(nn.Module):
    """LLaMA decoder; `__call__` returns the exits' hidden states, `head` makes logits.

    With `exits=None` every layer is an exit: exit n's logits are `head(out.hidden[n - 1])`, the
    full model's are `head(out.hidden[-1])`. With `exits=(L,)` only the final state is kept.
    """

    config: LlamaConfig
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str = "none"
    scan_unroll: int = 1

    def setup(self) -> None:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, name="embed_tokens",
            embedding_init=_init(0.02, ("vocab", "embed")), **kw)
        if self.remat_policy not in REMAT_POLICY_NAMES:
            raise ValueError(f"unknown remat policy {self.remat_policy!r}; "
                             f"known: {', '.join(REMAT_POLICY_NAMES)}")
        block: Any = DecoderLayer
        if self.remat_policy != "none":
            block = nn.remat(DecoderLayer, policy=remat_policies()[self.remat_policy],
                             prevent_cse=False)
        stack = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=nn.broadcast, length=cfg.num_hidden_layers, unroll=self.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"})
        self.layers = stack(cfg, attention_impl=resolve_attention_impl(
            self.attention_impl, self.dtype), name="layers", **kw)
        self.norm = RMSNorm(cfg.rms_norm_eps, name="norm", **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = LMHead(cfg.vocab_size, name="lm_head", **kw)

    def __call__(self, input_ids: Array, positions: Array | None = None,
                 attention_mask: Array | None = None, segment_ids: Array | None = None,
                 cache: KVCache | None = None,
                 exits: Sequence[int] | None = None) -> ModelOutput:
        h = self.embed(input_ids)
        return self.run_layers(h, positions, attention_mask, segment_ids, cache, exits)

    def embed(self, input_ids: Array) -> Array:
        h = embed_lookup(self.embed_tokens.embedding, input_ids.astype(jnp.int32), self.dtype)
        return nn.with_logical_constraint(h, (BATCH, LENGTH, ACT_EMBED))

    def run_layers(self, h: Array, positions: Array | None = None,
                   attention_mask: Array | None = None, segment_ids: Array | None = None,
                   cache: KVCache | None = None,
                   exits: Sequence[int] | None = None) -> ModelOutput:
        """The decoder stack alone, from an input hidden state `[B, T, D]`.

        positions: `[B, T]` position ids (default `arange(T)`); attention_mask: `[B, T]`, true
        for real tokens; segment_ids: `[B, T]` for packed rows (tokens attend within their
        segment). Without a cache, mask and segments absent, attention is plain causal with
        right padding given by the mask's row sums (the path cuDNN runs fastest). exits: layer
        numbers whose outputs to return (increasing; None = all).
        """
        num_layers = self.config.num_hidden_layers
        exits = check_exits(exits, num_layers)
        attention = self._attention_inputs(h, positions, attention_mask, segment_ids, cache)
        kv = None if cache is None else (cache.k, cache.v)
        final_only = exits == (num_layers,)
        buf = None if final_only else jnp.zeros((len(exits), *h.shape), h.dtype)
        buf = None if buf is None else nn.with_logical_constraint(
            buf, (None, BATCH, LENGTH, ACT_EMBED))
        slots = None if final_only else jnp.asarray(exit_slots(exits, num_layers))
        (last, new_kv, _, buf), _ = self.layers((h, kv, jnp.zeros((), jnp.int32), buf),
                                                LayerInputs(attention, slots))
        hidden = last[None] if final_only else buf
        hidden = nn.with_logical_constraint(hidden, (None, BATCH, LENGTH, ACT_EMBED))
        new_cache = None if cache is None else _advance_cache(cache, new_kv, h, positions,
                                                              attention_mask)
        return ModelOutput(hidden=hidden, cache=new_cache, exits=exits)

    def head(self, h: Array) -> Array:
        """Final RMSNorm + lm_head (or the tied embedding): fp32 logits.

        The matmul runs in the compute dtype and accumulates into fp32
        (`preferred_element_type`), as the training loss does, so decoding's early-exit
        confidences and speculative p/q are not computed from bf16-rounded logits.
        """
        x = self.norm(h)
        if self.config.tie_word_embeddings:
            logits = fp32_logits(x, self.embed_tokens.embedding.T)
        else:
            logits = self.lm_head(x)
        names = (BATCH, LENGTH, ACT_VOCAB)[-min(x.ndim, 3):]  # [..., B, T, V] or [B, V]
        return nn.with_logical_constraint(logits, (*([None] * (x.ndim - len(names))), *names))

    def touch_all(self, input_ids: Array) -> Array:
        """Runs every sub-module once (stack and head): what `init` needs to create all params."""
        return self.head(self(input_ids, exits=(self.config.num_hidden_layers,)).hidden[-1])

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _positions(h: Array, positions: Array | None) -> Array:
        if positions is not None:
            return positions.astype(jnp.int32)
        b, t = h.shape[:2]
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def _attention_inputs(self, h: Array, positions: Array | None, attention_mask: Array | None,
                          segment_ids: Array | None, cache: KVCache | None) -> AttentionInputs:
        b, t = h.shape[:2]
        pos = self._positions(h, positions)
        cos, sin = rotary_cos_sin(pos, self.config)
        if cache is None and segment_ids is None and positions is None:
            lengths = None
            if attention_mask is not None:
                lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
            return AttentionInputs(cos, sin, None, lengths, None)
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            k_pos = jnp.where(valid, pos, -1)
            slot_ok = jnp.ones((b, t), bool)
            index = None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
            index = cache.index
            k_pos = write_slots(cache.positions, jnp.where(valid, pos, -1), index)
            # each row attends its own slots [0, index + t): what lies past them (rolled-back
            # drafts, another row's longer history) is masked, not zeroed
            end = index[:, None] if index.ndim else index
            slot_ok = jnp.broadcast_to(jnp.arange(cache.max_len)[None, :] < end + t,
                                       (b, cache.max_len))
        mask = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= pos[:, :, None])
        mask &= slot_ok[:, None, :]
        if segment_ids is not None:
            mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
        return AttentionInputs(cos, sin, mask[:, None], None, index)


# ---------------------------------------------------------------------------------------------
# Functional helpers


def make_model(config: LlamaConfig, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, attention_impl: str = "xla",
               remat_policy: str = "none", scan_unroll: int = 1) -> Llama:
    return Llama(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                 remat_policy=remat_policy, scan_unroll=scan_unroll)


EXIT_ADAPTERS = "exit_adapters"  # params key of the exit adapters' layer stack


def with_exit_adapters(params: dict, config: LlamaConfig) -> dict:
    """`params` plus, where the config has exit adapters, their stack: adapter k starts as a
    copy of the layer right after exit k (0-based row k of `layers`). Works on boxed
    (logically partitioned) params too: the stack keeps the layers' axis names."""
    if not config.exit_adapters or EXIT_ADAPTERS in params:
        return params
    rows = jnp.asarray(config.exit_adapters)

    def take(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return x.replace_boxed(jnp.take(x.value, rows, axis=0))
        return jnp.take(x, rows, axis=0)

    stack = jax.tree.map(take, params["layers"],
                         is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return {**params, EXIT_ADAPTERS: stack}


def init_params(model: Llama, rng: Array, seq_len: int = 8) -> dict:
    """Random params (unboxed from their logical-axis metadata), exit adapters included."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(rng, ids, method=Llama.touch_all)["params"]
    return nn.unbox(with_exit_adapters(params, model.config))


def abstract_params(model: Llama, seq_len: int = 8) -> dict:
    """Shapes/dtypes of params with their logical-axis metadata, without allocating."""
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda i: with_exit_adapters(
        model.init(jax.random.PRNGKey(0), i, method=Llama.touch_all)["params"], model.config),
        ids)


def logical_axes(model: Llama) -> dict:
    """The logical axis names of every parameter, as a tree of `PartitionSpec`s."""
    return nn.get_partition_spec(abstract_params(model))


def _advance_cache(cache: KVCache, new_kv: tuple[Array, Array], h: Array,
                   positions: Array | None, attention_mask: Array | None) -> KVCache:
    """The cache after writing `h`'s T tokens (their K/V already in `new_kv`)."""
    t = h.shape[1]
    valid = jnp.ones(h.shape[:2], bool) if attention_mask is None else attention_mask
    pos = jnp.where(valid.astype(bool), Llama._positions(h, positions), -1)
    return KVCache(k=new_kv[0], v=new_kv[1],
                   positions=write_slots(cache.positions, pos.astype(jnp.int32), cache.index),
                   index=cache.index + t)


def run_layer_range(model: Llama, params: dict, h: Array, start: int, stop: int, *,
                    positions: Array | None = None, attention_mask: Array | None = None,
                    cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
    """Layers `[start, stop)` of the full params' one stacked copy over `h [B, T, D]`.

    Decoding runs segments of the stack (a draft `[0, k)`, a verifier `[k, L)`, early-exit
    rungs); slicing `params["layers"][a:b]` per segment would copy those weights (a 7B model's
    layers twice in memory). Here a loop reads layer i in place (a dynamic slice of the
    stacked weights inside the loop body: one layer's worth of temporaries), through the same
    `DecoderLayer` the training scan runs. `cache` holds `stop - start` layers (its row
    `i - start` is layer i). Returns the state after layer `stop - 1` and the updated cache.
    """
    big_l = model.config.num_hidden_layers
    if not 0 <= start < stop <= big_l:
        raise ValueError(f"layer range [{start}, {stop}) outside 0..{big_l}")
    attention = model.apply({"params": params}, h, positions, attention_mask, None, cache,
                            method=Llama._attention_inputs)
    layer = DecoderLayer(model.config, dtype=model.dtype, param_dtype=model.param_dtype,
                         attention_impl=resolve_attention_impl(model.attention_impl, model.dtype))
    inputs = LayerInputs(attention, None)
    stacked = params["layers"]

    def body(i: Array, carry: tuple) -> tuple:
        x, kv = carry
        weights = jax.tree.map(
            lambda w: jax.lax.dynamic_index_in_dim(w, i, axis=0, keepdims=False), stacked)
        (x, kv, _, _), _ = layer.apply({"params": weights}, (x, kv, i - start, None), inputs)
        return x, kv

    kv = None if cache is None else (cache.k, cache.v)
    h, kv = jax.lax.fori_loop(start, stop, body, (h, kv))
    new_cache = None if cache is None else _advance_cache(cache, kv, h, positions,
                                                          attention_mask)
    return h, new_cache


def slice_layers(params: dict, start: int, stop: int) -> dict:
    """Params whose `layers` stack holds only layers [start, stop) (same embed/norm/head)."""
    out = dict(params)
    out["layers"] = jax.tree.map(lambda x: x[start:stop], params["layers"])
    return out


def head_weights(params: dict, config: LlamaConfig) -> tuple[Array, Array]:
    """(final-norm scale `[D]`, head kernel `[D, V]`): what the chunked SoFT loss needs."""
    if config.tie_word_embeddings:
        return params["norm"]["scale"], params["embed_tokens"]["embedding"].T
    return params["norm"]["scale"], params["lm_head"]["kernel"]
