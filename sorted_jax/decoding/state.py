"""What decoding carries: the traced state of a batch and the segments of layers it runs.

`Control` holds per-call knobs (changing them never recompiles), `DecodeState` the batch
between steps (KV caches, exit buffers, outputs, per-row lengths), `LadderCounts` /
`SpecCounts` the device-side statistics; `Stack` runs segments [a, b) of one model over its one
stacked copy of the layer weights, exit adapters included. `programs` builds the jitted
algorithms on them.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from sorted_jax.decoding.sampling import SamplingParams
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.exit_adapters import adapter_index
from sorted_jax.model.kv_cache import KVCache, write_slots
from sorted_jax.model.modeling import (
    EXIT_ADAPTERS,
    make_model,
    run_layer_range,
    run_layers_collecting,
)

Array = jax.Array


@flax.struct.dataclass
class Control:
    """Per-call traced knobs (changing them does not recompile)."""

    sampling: SamplingParams
    eos: Array  # [E] int32 (-1 entries never match)
    max_new: Array  # [] int32
    thresholds: Array  # [num_segments] float32 (early exit; the last entry is ignored)
    # speculative, dynamic (`speculative.plan_drafts`): the cost of one draft pass and of a
    # verify pass at each compiled width, relative to a plain full-model step (width 1 = 1.0)
    draft_cost: Array  # [] float32
    verify_cost: Array  # [num_widths] float32
    force_drafts: Array  # [] int32: >= 0 drafts exactly this many every round; -1 = the policy
    spec_finish: Array  # [] bool: the policy minimises the batch's finishing time (a fixed
    #                     batch, `generate`), else maximises tokens per second (rows that join)
    # early exit: the batch checks its exits while they skip at least this many layers per
    # step (x 256, `programs.Programs._watch`); 0 = check every token (the paper's rule)
    ee_min_saved: Array  # [] int32


@flax.struct.dataclass
class DecodeState:
    caches: tuple  # speculative: one KVCache per segment; fixed / early exit: one KVCache of
    #                all the route's layers, shared by its segments (each its own layers' rows)
    acaches: tuple  # per segment: its exit adapter's one-layer KVCache, or None (no adapter)
    hbuf: tuple  # early exit: hidden state after each exit boundary, [B, S, D] per boundary
    last: Array  # [B] the last generated token (input of the next step)
    pos: Array  # [B] its position
    n: Array  # [B] tokens generated so far per row (stops growing when the row is done)
    out: Array  # [B, O] generated ids
    length: Array  # [B] generated length per row (stops growing when the row is done)
    done: Array  # [B]
    key: Array
    draft_len: Array  # [B] speculative adaptive window, per row ("always" drafting)
    accept: Array  # [B, 2] float32 speculative: decayed (accepted, accepted + rejected) per row
    plain: Array  # [2] int32 speculative: (plain rounds in a row, plain rounds before a probe)
    frontiers: Array  # [num_segments] int32, early exit: each segment's next slot to process
    ee_watch: Array  # [3] int32 early exit: (layers the batch's checked steps skipped, a
    #                  decayed mean x 256; steps left unchecked; the current unchecked stretch)
    stats: LadderCounts | SpecCounts


@flax.struct.dataclass
class LadderCounts:
    """Fixed / early exit: tokens per exit (active rows only) and the sum of their layers."""

    exit_hist: Array  # [num_segments] int32
    exit_layer_sum: Array  # [] int32
    # [3] int32, early exit: steps run as the ladder, as one loop then the checks, as one
    # loop unchecked (`programs.Programs._ladder_step`)
    paths: Array


@flax.struct.dataclass
class SpecCounts:
    """Speculative decoding, summed over rounds (see `results.SpeculativeStats`)."""

    rounds: Array
    drafted: Array
    accepted: Array
    committed_drafts: Array
    draft_passes: Array
    row_committed: Array  # [B] drafts committed per row
    row_rounds: Array  # [B] verify rounds per row (while it was unfinished)
    plain_rounds: Array  # [] rounds that drafted nothing (a plain full-model step)

    @classmethod
    def zeros(cls, batch: int) -> SpecCounts:
        z, zb = jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32)
        return cls(z, z, z, z, z, zb, zb, z)


def commit(st: DecodeState, y: Array, count: Array, ctl: Control) -> dict:
    """Append the first `count[b]` tokens of `y [B, W]` to each unfinished row b, at its own
    offset `n[b]`; EOS / max_new stop rows. Finished rows do not move."""
    active = ~st.done
    count = jnp.broadcast_to(count, active.shape)
    out = write_slots(st.out, y, st.n)  # past a row's length: never read
    real = jnp.arange(y.shape[1])[None, :] < count[:, None]
    is_eos = jnp.any(y[..., None] == ctl.eos, axis=-1) & real
    has_eos = jnp.any(is_eos, axis=1)
    first = jnp.argmax(is_eos, axis=1).astype(jnp.int32)
    new_len = jnp.minimum(st.n + jnp.where(has_eos, first + 1, count), ctl.max_new)
    n = st.n + jnp.where(active, count, 0)
    return dict(out=out, length=jnp.where(active, new_len, st.length), n=n,
                done=st.done | (active & has_eos) | (n >= ctl.max_new))


class Stack:
    """Segments [a, b) of one model, all run over the full params' one stacked copy of the
    layer weights (`modeling.run_layer_range`: no per-segment copies); each segment has its
    own `KVCache` of b - a layers. A segment that ends at an exit with an adapter
    (`model.exit_adapters`) reads its logits through that adapter layer, which keeps its own
    one-layer cache; the next segment continues from the trunk's state, not the adapter's."""

    def __init__(self, config: LlamaConfig, bounds: tuple[tuple[int, int], ...], dtype: Any,
                 attention_impl: str):
        self.config = config
        self.bounds = bounds
        self.model = make_model(config, dtype=dtype, attention_impl=attention_impl)
        self.adapter_rows = tuple(adapter_index(config, b) for _, b in bounds)

    @property
    def dtype(self) -> Any:
        return self.model.dtype

    def embed(self, params: dict, ids: Array) -> Array:
        return self.model.apply({"params": params}, ids, method="embed")

    def head(self, params: dict, h: Array) -> Array:
        """fp32 logits of h `[B, D]` or `[B, T, D]` through the final norm + lm_head."""
        x = h[:, None] if h.ndim == 2 else h
        logits = self.model.apply({"params": params}, x, method="head")
        return (logits[:, 0] if h.ndim == 2 else logits).astype(jnp.float32)

    def run(self, s: int, params: dict, h: Array, positions: Array, valid: Array | None,
            cache: KVCache, shared: bool = False) -> tuple[Array, KVCache]:
        """Segment s over `cache`: its own (`b - a` layers), or `shared` (all the route's
        layers, row i = layer i) from `cache.index`."""
        a, b = self.bounds[s]
        return run_layer_range(self.model, params, h, a, b, positions=positions,
                               attention_mask=valid, cache=cache,
                               cache_start=0 if shared else a)

    def run_all(self, params: dict, h: Array, positions: Array, cache: KVCache,
                collect: bool = True) -> tuple[Array | None, Array, KVCache]:
        """Every segment in one loop over the shared cache: (the state at each exit boundary
        but the last `[num_segments - 1, B, T, D]`, or None unless `collect`; the last one;
        the cache)."""
        top = self.bounds[-1][1]
        if not collect:
            h, cache = run_layer_range(self.model, params, h, 0, top, positions=positions,
                                       cache=cache, cache_start=0)
            return None, h, cache
        return run_layers_collecting(self.model, params, h, top,
                                     tuple(b for _, b in self.bounds[:-1]),
                                     positions=positions, cache=cache)

    def adapt(self, s: int, params: dict, h: Array, positions: Array, valid: Array | None,
              acache: KVCache | None) -> tuple[Array, KVCache | None]:
        """Segment s's output through its exit adapter (what its logits read); unchanged
        where the segment's exit has none."""
        a = self.adapter_rows[s]
        if a is None:
            return h, acache
        return run_layer_range(self.model, {**params, "layers": params[EXIT_ADAPTERS]}, h, a,
                               a + 1, positions=positions, attention_mask=valid, cache=acache)

    def init_caches(self, batch: int, slots: int, dtype: Any, per_row: bool = False) -> tuple:
        return tuple(KVCache.init(self.config.layers_config(b - a), batch, slots,
                                  dtype, per_row=per_row) for a, b in self.bounds)

    def init_shared_cache(self, batch: int, slots: int, dtype: Any) -> KVCache:
        """One cache of every layer the route runs, [0, last exit), for its segments."""
        return KVCache.init(self.config.layers_config(self.bounds[-1][1]), batch, slots, dtype)

    def init_adapter_caches(self, batch: int, slots: int, dtype: Any,
                            per_row: bool = False) -> tuple:
        return tuple(None if a is None else KVCache.init(self.config.layers_config(1), batch,
                                                         slots, dtype, per_row=per_row)
                     for a in self.adapter_rows)
