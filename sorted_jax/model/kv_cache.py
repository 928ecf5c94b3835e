"""The decoding KV cache: every layer's keys and values in one `[L, ...]` buffer.

The cache rides in the decoder scan's carry and each layer writes its own rows in place, so
decoding reuses the training model's code (no second model) and a decode step writes only the
new tokens' keys and values, not the whole cache. Its write index is shared by all rows or per
row (`[B]`: speculative batches whose rows commit different counts).

Layout `[L, B, K, S, Dh]`: slots after heads, the layout attention's dots read without a
transpose (`layers.cached_attention`). A `[B, S, K, Dh]` layer made XLA:CPU transpose the
layer's whole cache, K and V, on every decode step: 1.7 of 2.3 ms per step at batch 16 on the
tiny SoFT model (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from sorted_jax.model.config import LlamaConfig

Array = jax.Array
Dtype = Any


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

    k: Array  # [L, B, K, S, Dh]
    v: Array  # [L, B, K, S, Dh]
    positions: Array  # [B, S] int32
    index: Array  # [] or [B] int32

    @classmethod
    def init(cls, config: LlamaConfig, batch: int, max_len: int,
             dtype: Dtype = jnp.bfloat16, per_row: bool = False) -> KVCache:
        shape = (config.num_hidden_layers, batch, config.kv_heads, max_len, config.dim_per_head)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   positions=jnp.full((batch, max_len), -1, jnp.int32),
                   index=jnp.zeros((batch,) if per_row else (), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

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



def write_kv(buf: Array, new: Array, index: Array, layer: Array | int) -> Array:
    """Layer `layer` of a cache buffer `[L, B, K, S, Dh]` (in place) with the new tokens' keys
    or values `new [B, T, K, Dh]` written at slots `index .. index + T - 1` (`write_slots`'
    rules: a scalar index is one `dynamic_update_slice`, a `[B]` one scatters each row at its
    own offset and drops writes past the last slot)."""
    new = jnp.swapaxes(new, 1, 2).astype(buf.dtype)  # [B, K, T, Dh]
    if index.ndim == 0:
        zero = jnp.zeros((), jnp.int32)
        return jax.lax.dynamic_update_slice(buf, new[None], (layer, zero, zero, index, zero))
    b, k, t = new.shape[:3]
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(k)[None, :, None]
    cols = index[:, None, None] + jnp.arange(t)[None, None, :]
    return buf.at[layer, rows, heads, cols].set(new, mode="drop")
