"""The LLaMA model: the decoder stack under `nn.scan`, handing out the exits' hidden states.

SoFT reads the hidden state after each exit layer n (not normed), so the scan carries an
`[K, B, T, D]` buffer of the K requested exits beside its `[B, T, D]` state, and each layer
writes its output into the slot of the next exit at or above it (layers between exits overwrite
the slot; the exit layer writes last). The buffer update is a `dynamic_update_slice`, linear, so
the backward pass keeps no per-layer copy of it: training costs K stacked states (the loss needs
them), not L. SFT (the one exit L) needs no buffer at all: its exit is the scan's final state.
Weights sit on a leading `layers` axis, so the sub-model of depth k is the same params sliced
`[:k]` run by a scan of length k (see `slice_layers`), costing k layers of compute.

The layers themselves are `sorted_jax.model.layers`; the KV cache (`sorted_jax.model.kv_cache`)
rides in the scan's carry, so decoding runs this exact code. Decoding runs segments `[a, b)` of
the stack with `run_layer_range`, a loop that reads layer i of the one stacked copy in place
(slicing per segment would copy the weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.kv_cache import KVCache, write_slots
from sorted_jax.model.layers import (
    ACT_EMBED,
    ACT_VOCAB,
    BATCH,
    LENGTH,
    MLP,
    Attention,
    AttentionInputs,
    LMHead,
    RMSNorm,
    embed_lookup,
    fp32_logits,
    normal_init,
    rotary_cos_sin,
)
from sorted_jax.model.lora import LoraSpec

Array = jax.Array
Dtype = Any

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "blockwise", "auto")


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
    """`auto`: cuDNN's fused attention on a GPU in half precision (its fast case); on CPU the
    blockwise attention (`sorted_jax.model.blockwise_attention`: no `[B, H, T, T]` scores),
    which a same-run A/B measured 1.42x faster per SFT step (`bench/train_step.py --size
    cpu-bench --dtype float32`, docs/benchmarks.md); elsewhere XLA's reference."""
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        backend = jax.default_backend()
        if backend == "cpu":
            return "blockwise"
        half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        return "cudnn" if backend == "gpu" and half else "xla"
    return impl


# ---------------------------------------------------------------------------------------------
# The decoder layer (the scan body)


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
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, carry: tuple, layer_inputs: LayerInputs) -> tuple[tuple, None]:
        h, cache, layer, exit_buf = carry
        inputs = layer_inputs.attention
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.with_logical_constraint(h, (BATCH, LENGTH, ACT_EMBED))
        attn_out, cache = Attention(cfg, implementation=self.attention_impl, name="self_attn",
                                    lora=self.lora, **kw)(
            RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(h), inputs, cache, layer)
        h = h + attn_out
        mlp_out = MLP(cfg, name="mlp", lora=self.lora, **kw)(
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
    # LoRA adapters on a frozen (possibly quantised) base: `sorted_jax.model.lora`.
    lora: LoraSpec | None = None

    def setup(self) -> None:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, name="embed_tokens",
            embedding_init=normal_init(0.02, ("vocab", "embed")), **kw)
        if self.remat_policy not in REMAT_POLICY_NAMES:
            raise ValueError(f"unknown remat policy {self.remat_policy!r}; "
                             f"known: {', '.join(REMAT_POLICY_NAMES)}")
        block: Any = DecoderLayer
        if self.remat_policy != "none":
            block = nn.remat(DecoderLayer, policy=remat_policies()[self.remat_policy],
                             prevent_cse=False)
        stack = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast, length=cfg.num_hidden_layers, unroll=self.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"})
        self.layers = stack(cfg, attention_impl=resolve_attention_impl(
            self.attention_impl, self.dtype), lora=self.lora, name="layers", **kw)
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
        blockwise = resolve_attention_impl(self.attention_impl, self.dtype) == "blockwise"
        if cache is None and segment_ids is not None and blockwise:
            # packed rows, positions rising within each segment: index order is causal order,
            # and the blockwise attention builds each block's mask from these vectors
            return AttentionInputs(cos, sin, None, None, None, segment_ids.astype(jnp.int32),
                                   valid)
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
               remat_policy: str = "none", scan_unroll: int = 1,
               lora: LoraSpec | None = None) -> Llama:
    return Llama(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                 remat_policy=remat_policy, scan_unroll=scan_unroll, lora=lora)


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
                    cache: KVCache | None = None, cache_start: int | None = None
                    ) -> tuple[Array, KVCache | None]:
    """Layers `[start, stop)` of the full params' one stacked copy over `h [B, T, D]`.

    Decoding runs segments of the stack (a draft `[0, k)`, a verifier `[k, L)`, early-exit
    rungs); slicing `params["layers"][a:b]` per segment would copy those weights (a 7B model's
    layers twice in memory). Here a loop reads layer i in place (a dynamic slice of the
    stacked weights inside the loop body: one layer's worth of temporaries), through the same
    `DecoderLayer` the training scan runs. `cache`'s row `i - cache_start` is layer i
    (`cache_start` defaults to `start`: a cache of `stop - start` layers; 0: a cache of all
    layers, shared by segments). Returns the state after layer `stop - 1` and the updated
    cache.
    """
    h, new_cache, _ = _layer_loop(model, params, h, start, stop, positions, attention_mask,
                                  cache, start if cache_start is None else cache_start, ())
    return h, new_cache


def run_layers_collecting(model: Llama, params: dict, h: Array, stop: int,
                          exits: tuple[int, ...], *, positions: Array | None = None,
                          attention_mask: Array | None = None, cache: KVCache | None = None
                          ) -> tuple[Array, Array, KVCache | None]:
    """Layers `[0, stop)` in one loop (`run_layer_range`, the cache's row i is layer i), also
    keeping the state after each layer of `exits` (increasing, < stop): (`[len(exits), B, T,
    D]` exit states, the state after layer `stop - 1`, the updated cache)."""
    if not exits or list(exits) != sorted(set(exits)) or not 0 < exits[0] <= exits[-1] < stop:
        raise ValueError(f"exits must increase within 1..{stop - 1}, got {exits}")
    h, new_cache, states = _layer_loop(model, params, h, 0, stop, positions, attention_mask,
                                       cache, 0, tuple(exits))
    return states, h, new_cache


def _layer_loop(model: Llama, params: dict, h: Array, start: int, stop: int,
                positions: Array | None, attention_mask: Array | None, cache: KVCache | None,
                cache_start: int, exits: tuple[int, ...]
                ) -> tuple[Array, KVCache | None, Array | None]:
    """(state after layer stop - 1, updated cache, exit states or None)."""
    big_l = model.config.num_hidden_layers
    if not 0 <= start < stop <= big_l:
        raise ValueError(f"layer range [{start}, {stop}) outside 0..{big_l}")
    attention = model.apply({"params": params}, h, positions, attention_mask, None, cache,
                            method=Llama._attention_inputs)
    layer = DecoderLayer(model.config, dtype=model.dtype, param_dtype=model.param_dtype,
                         attention_impl=resolve_attention_impl(model.attention_impl, model.dtype))
    inputs = LayerInputs(attention, None)
    stacked = params["layers"]
    # each layer writes its output into the slot of the next exit at or above it (the exit's
    # own layer writes last), layers above the last exit into a scratch slot: one write a
    # layer, no read
    slots = np.where((s := exit_slots(exits, big_l)) < 0, len(exits), s) if exits else None

    def body(i: Array, carry: tuple) -> tuple:
        x, kv, buf = carry
        weights = jax.tree.map(
            lambda w: jax.lax.dynamic_index_in_dim(w, i, axis=0, keepdims=False), stacked)
        (x, kv, _, _), _ = layer.apply({"params": weights}, (x, kv, i - cache_start, None),
                                       inputs)
        if buf is not None:
            buf = jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype),
                                                      jnp.asarray(slots)[i], axis=0)
        return x, kv, buf

    kv = None if cache is None else (cache.k, cache.v)
    buf = jnp.zeros((len(exits) + 1, *h.shape), h.dtype) if exits else None
    h, kv, buf = jax.lax.fori_loop(start, stop, body, (h, kv, buf))
    new_cache = None if cache is None else _advance_cache(cache, kv, h, positions,
                                                          attention_mask)
    return h, new_cache, None if buf is None else buf[:-1]


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
