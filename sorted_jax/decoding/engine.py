"""KV-cached decoding at any exit, early exit and self-speculative decoding: `Decoder`.

    dec = Decoder(params, config)
    res = dec.generate(prompts, mode="early-exit", max_new_tokens=64)   # or options=...
    res.tokens, res.stats.avg_exit_layer

A request is a frozen `options.DecodeOptions`; its `Route` picks the segment layout; the
compiled programs are `programs.Programs` values (shared by every decoder of the same model
shape and layout); results are typed (`results`). One engine serves all modes.

The decoder stack is cut into *segments* of consecutive layers `[a, b)`, each a loop over
layers a..b-1 of the one stacked copy of the weights writing its own layers' K/V (speculative:
a `KVCache` per segment; fixed and early exit: one `KVCache` of all the route's layers, each
segment its own rows and its own frontier), so running a segment costs exactly its layers:

* ``fixed`` (depth k): one segment `[0, k)`; every token costs k layers + the head.
* ``early-exit`` (exits e1 < e2 < ... < em): segments `[0, e1), [e1, e2), ...`; a token runs
  segment after segment and stops at the first exit whose top-1 probability reaches its
  threshold (the last exit always accepts). Deeper segments run under a branch
  (`inplace.run_if`), so skipped layers cost nothing for that token. When the batch's recent
  steps skipped few layers (some row nearly always needs the last exit) and no segment lags,
  a step runs every segment in one loop and then every exit's check at once: the same exits,
  logits and K/V, without a loop and a branch per segment.
* ``speculative`` (draft depth k): segments `[0, k)` (the draft, which is also the bottom of
  the full model) and `[k, L)`. Verification *reuses* the draft's work: the draft wrote layers
  [0, k)'s K/V for the last committed token and the drafts d_1..d_{n-1} and kept their
  layer-k hidden states; the verify pass runs layers [0, k) for d_n alone, then layers [k, L)
  once over all n + 1 tokens (the narrowest compiled width >= n + 1, padding masked).
  Rejected tokens are rolled back by moving both caches' `index` back. How many tokens a
  round drafts (0: a plain full-model step) is `speculative.plan_drafts`' choice ("dynamic",
  the default: only when the measured costs and the rows' acceptance say it pays) or each
  row's adaptive window ("always").

Early exit decides with the top-1 probability of the plain softmax (T = 1) of each exit's
logits, then picks the token from the chosen exit's logits with the sampling settings. The
first generated token (from the prefill, where every layer runs anyway) follows the same rule.
In a batch, a deeper segment runs when any unfinished row still needs it; rows that already
exited keep their token. The batch checks only while its checks skip enough layers
(`ee_min_saving`; `Programs._watch`), else it runs unchecked full-depth steps for a stretch.

**Batches** are left-padded to a common prompt length P (padding slots hold position -1 in the
cache, so they are never attended); row b's tokens keep their own positions 0, 1, .... Fixed
depth and early exit write the same cache slot in every row each step (one shared index).

**Early-exit K/V policy: lazy, exact.** A token that exits at e_s has no K/V yet in the layers
above e_s. Its hidden state after each computed segment is kept in a per-segment buffer
(`hbuf`, [B, S, D] per exit boundary), and each segment keeps a frontier (`frontiers[s]`):
the first slot it has not processed. When a later token needs segment s, segment s first runs
over all its pending slots `[frontier, current]` in one pass (chunks of `ee_chunk` slots), which
writes the skipped tokens' K/V and computes the current token in the same causal pass. Every
K/V therefore equals what the full model computes for the same tokens, so an exit's logits
equal that exit's logits in a full forward pass without cache: early exit only changes which
exit emits each token, never any hidden state. Deferred work is batched with the next deep
token (one pass over several tokens costs about one token's weight reads on an accelerator).

**Speculative batching policy: per row.** Each row has its own cache length (`KVCache.index`
is `[B]`), output offset, acceptance and (always-draft) adaptive window (start 4, +2 when the
row accepted every draft, else -1, in [1, max_draft], never past max_new_tokens). A round
drafts until the longest window of an unfinished row is full (dynamic: every row drafts the
round's n); row b's verifier accepts a_b of its n_b drafts and the row commits those a_b
drafts plus its correction / bonus token, so rows advance by different amounts and finish
independently. Rejected drafts' K/V stay in slots past the row's length,
which attention masks by that length (they are overwritten later, never attended). Greedy
output equals the full model's row by row, and sampled output is distributed as the full
model's (each row's acceptance is the standard rejection rule on its own prefix).
`spec_commit="lockstep"` instead cuts every row at the slowest row's count (m = min a_b over
unfinished rows: its first m drafts plus the token its own verification produced at m + 1); it
does the same work per round and commits fewer tokens, so it is kept only as the baseline
`bench/decode.py` compares against.

**Memory.** Every segment runs over the full params' one stacked copy of the layer weights
(`modeling.run_layer_range` reads layer i in place): decoding holds params + caches + small
temporaries, whatever the layout. Early exit keeps `[B, S, D]` hidden states per exit
boundary; the cache has `max_len` + a small slack of slots (chunked writes never clamp).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax.core.errors import DecodeError
from sorted_jax.decoding.costs import SpecCosts, measure
from sorted_jax.decoding.options import (
    MODES,
    PAPER_THRESHOLDS,
    DecodeOptions,
    Route,
    default_thresholds,
)
from sorted_jax.decoding.programs import Programs
from sorted_jax.decoding.results import (
    DecodeMemory,
    DecodeStats,
    EarlyExitStats,
    FixedStats,
    GenerationResult,
    SpeculativeStats,
)
from sorted_jax.decoding.sampling import SamplingParams
from sorted_jax.decoding.speculative import SPECULATION
from sorted_jax.decoding.state import Control, LadderCounts
from sorted_jax.model.config import LlamaConfig
from sorted_jax.objective.soft import default_exits  # the exit set SoFT trains by default

# Speculative batches: each row commits its own accepted drafts ("per-row", the default) or
# every row stops at the slowest row's count ("lockstep", kept for comparison: bench/decode.py).
SPEC_COMMITS = ("per-row", "lockstep")

__all__ = ["MODES", "PAPER_THRESHOLDS", "DecodeOptions", "Decoder", "GenerationResult",
           "default_exits", "default_thresholds", "generate"]


class Decoder:
    """Decoding for one model: `generate` (batched, one jitted while-loop) and `stream`.

    params: our params tree (full model); config: its `LlamaConfig`. Every layout runs over
    these params in place (no per-segment copies). Compiled programs are shared by all decoders
    of the same config (`Programs` is a hashable value), so tests and benchmarks compile each
    shape once.
    """

    def __init__(self, params: dict, config: LlamaConfig, *, dtype: Any = jnp.float32,
                 cache_dtype: Any = None, attention_impl: str = "xla", max_draft: int = 8,
                 ee_chunk: int = 8, pad_multiple: int = 8, spec_commit: str = "per-row",
                 speculation: str = "dynamic", spec_costs: SpecCosts | None = None,
                 ee_min_saving: float = 0.0, compiler_options: dict[str, Any] | None = None):
        if spec_commit not in SPEC_COMMITS:
            raise DecodeError(f"spec_commit must be one of {', '.join(SPEC_COMMITS)}, got "
                              f"{spec_commit!r}")
        if speculation not in SPECULATION:
            raise DecodeError(f"speculation must be one of {', '.join(SPECULATION)}, got "
                              f"{speculation!r}")
        if not 0 <= ee_min_saving <= 1:
            raise DecodeError(f"ee_min_saving must be in [0, 1] (0 = check every token), got "
                              f"{ee_min_saving!r}")
        if max_draft < 1:
            raise DecodeError(f"max_draft must be >= 1, got {max_draft}")
        if ee_chunk < 1:
            raise DecodeError(f"ee_chunk must be >= 1, got {ee_chunk}")
        self.params, self.config = params, config
        self.dtype = dtype
        self.cache_dtype = dtype if cache_dtype is None else cache_dtype
        self.attention_impl = attention_impl
        self.max_draft, self.ee_chunk, self.pad_multiple = max_draft, ee_chunk, pad_multiple
        self.spec_commit, self.speculation = spec_commit, speculation
        self.spec_costs, self.ee_min_saving = spec_costs, ee_min_saving
        self.measured_costs: dict[tuple, SpecCosts] = {}  # (programs, batch, slots, program)
        self.compiler_options = tuple(sorted((compiler_options or {}).items()))
        self.last_stats: DecodeStats | None = None

    # -- requests ----------------------------------------------------------------------------
    @staticmethod
    def options(options: DecodeOptions | None = None, **kwargs: Any) -> DecodeOptions:
        """`options` with `kwargs` replaced, or `DecodeOptions(**kwargs)` (checked)."""
        if options is None:
            return DecodeOptions(**kwargs)
        return options.replace(**kwargs) if kwargs else options

    def route(self, options: DecodeOptions | None = None, **kwargs: Any) -> Route:
        """The segment layout of a request on this model (raises `DecodeError` if it does
        not fit: a layer out of range, thresholds that do not match the exits, ...)."""
        return self.options(options, **kwargs).route(self.config)

    def programs(self, route: Route, greedy: bool) -> Programs:
        return Programs.make(self.config, route, greedy=greedy, dtype=self.dtype,
                             cache_dtype=self.cache_dtype, attention_impl=self.attention_impl,
                             ee_chunk=self.ee_chunk, max_draft=self.max_draft,
                             spec_commit=self.spec_commit, speculation=self.speculation,
                             compiler_options=self.compiler_options)

    def _check_prompts(self, prompts: Any) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise DecodeError("prompts must be a list of token-id lists")
        if len(prompts) == 0:
            raise DecodeError("no prompts given")
        prompts = [[int(t) for t in p] for p in prompts]
        vocab = self.config.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise DecodeError(f"prompt {i} is empty: at least one token (e.g. BOS) is "
                                  "needed")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise DecodeError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
        return prompts

    def _layout(self, prompts: list[list[int]], opts: DecodeOptions) -> tuple[int, int]:
        """(padded prompt length, KV cache slots incl. the chunked-write slack)."""
        longest = max(len(p) for p in prompts)
        n = opts.max_new_tokens
        ctx = self.config.max_position_embeddings
        if longest + n > ctx:
            raise DecodeError(f"prompt of {longest} tokens + max_new_tokens={n} exceeds the "
                              f"model's context of {ctx} positions")
        p_len = -(-longest // self.pad_multiple) * self.pad_multiple
        need = p_len + n
        max_len = -(-need // 64) * 64 if opts.max_len is None else opts.max_len
        if need > max_len:
            raise DecodeError(
                f"the KV cache holds {max_len} slots but prompt ({longest} tokens, padded to "
                f"{p_len}) + max_new_tokens={n} needs {need}; raise max_len or shorten the "
                "prompt / generation")
        return p_len, max_len + max(self.ee_chunk, self.max_draft + 1)

    def _start(self, prompts: Any, opts: DecodeOptions):
        """(route, programs, params, control, prefill inputs, cache slots)."""
        route = opts.route(self.config)
        prompts = self._check_prompts(prompts)
        p_len, slots = self._layout(prompts, opts)
        b = len(prompts)
        ids = np.zeros((b, p_len), np.int32)
        valid = np.zeros((b, p_len), bool)
        pos = np.zeros((b, p_len), np.int32)
        for i, p in enumerate(prompts):
            ids[i, p_len - len(p):] = p
            valid[i, p_len - len(p):] = True
            pos[i, p_len - len(p):] = np.arange(len(p))
        sp = SamplingParams.make(opts.temperature if opts.temperature > 0 else 1.0, opts.top_k,
                                 opts.top_p)
        th = np.asarray([*route.thresholds, 0.0], np.float32)
        progs = self.programs(route, opts.greedy)
        widths = progs.widths if route.kind == "speculative" else (1,)
        ctl = Control(sp, jnp.asarray(np.asarray([*opts.eos_ids(self.config), -1], np.int32)),
                      jnp.asarray(opts.max_new_tokens, jnp.int32), jnp.asarray(th),
                      draft_cost=jnp.ones((), jnp.float32),
                      verify_cost=jnp.ones((len(widths),), jnp.float32),
                      force_drafts=jnp.asarray(-1, jnp.int32),
                      spec_finish=jnp.asarray(False),
                      ee_min_saved=jnp.asarray(self._min_saved(route), jnp.int32))
        inputs = (jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(pos),
                  jax.random.PRNGKey(opts.seed), ctl)
        return route, progs, self.params, ctl, inputs, slots

    def _min_saved(self, route: Route) -> int:
        """`ee_min_saving` of the route's layers, in `Programs._watch`'s units (x 256)."""
        return int(np.ceil(self.ee_min_saving * route.bounds[-1][1] * 256))

    def _costed(self, progs: Programs, st: Any, ctl: Control, program: str) -> Control:
        """`ctl` with the speculative round's costs (dynamic speculation): `spec_costs` if
        given, else measured once per (programs, batch, slots) through `program`."""
        if progs.kind != "speculative" or progs.speculation != "dynamic":
            return ctl
        costs = self.spec_costs
        if costs is None:
            key = (progs, st.last.shape[0], st.out.shape[1], program)
            if key not in self.measured_costs:
                self.measured_costs[key] = measure(progs, self.params, st, ctl,
                                                   getattr(progs, program),
                                                   per_call=program == "step")
            costs = self.measured_costs[key]
        draft, verify = costs.at(progs.widths)
        return ctl.replace(draft_cost=jnp.asarray(draft, jnp.float32),
                           verify_cost=jnp.asarray(verify))

    # -- decoding ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], options: DecodeOptions | None = None,
                 **kwargs: Any) -> GenerationResult:
        """Generate for a batch of token-id prompts (BOS included if the model wants one).

        `options` and/or `DecodeOptions`' fields as keywords (mode, exit_layer, exits,
        thresholds, draft_layer, max_new_tokens, temperature, top_k, top_p, seed, eos_id,
        max_len); see `DecodeOptions`.
        """
        t0 = time.perf_counter()
        opts = self.options(options, **kwargs)
        route, progs, params, ctl, inputs, slots = self._start(prompts, opts)
        st = progs.prefill(params, *inputs, slots=slots)
        ctl = self._costed(progs, st, ctl, "loop").replace(spec_finish=jnp.asarray(True))
        st = progs.loop(params, st, ctl)
        out, length, counts = jax.device_get((st.out, st.length, st.stats))
        tokens = [out[i, :length[i]].tolist() for i in range(out.shape[0])]
        return GenerationResult(tokens, _stats(opts.mode, route, counts, tokens,
                                               time.perf_counter() - t0))

    def start(self, prompts: Sequence[Sequence[int]], options: DecodeOptions | None = None,
              **kwargs: Any) -> BatchRun:
        """A batch decoded round by round (one token, or one speculative round, per
        `advance`): what a server streams from. Takes `generate`'s options."""
        opts = self.options(options, **kwargs)
        route, progs, params, ctl, inputs, slots = self._start(prompts, opts)
        st = progs.prefill(params, *inputs, slots=slots)
        return BatchRun(self, opts, route, progs, params, self._costed(progs, st, ctl, "step"),
                        st)

    def memory(self, prompts: Sequence[Sequence[int]], options: DecodeOptions | None = None,
               **kwargs: Any) -> DecodeMemory:
        """What decoding these prompts with these options holds on the device, from the
        compiled loop (nothing runs): params + decode state + XLA temporaries."""
        opts = self.options(options, **kwargs)
        _, progs, params, ctl, inputs, slots = self._start(prompts, opts)
        st = progs.prefill_shape(params, *inputs, slots=slots)
        mem = progs.compiled_loop(params, st, ctl).memory_analysis()
        return DecodeMemory(params=_nbytes(params), state=_nbytes(st),
                            temp=int(mem.temp_size_in_bytes), weight_copies=0)

    def stream(self, prompt: Sequence[int], options: DecodeOptions | None = None,
               **kwargs: Any) -> Iterator[list[int]]:
        """Generate for one prompt, yielding each step's new token ids as they are made.

        Takes `generate`'s options. After the iterator ends, `self.last_stats` holds the
        run's statistics.
        """
        t0 = time.perf_counter()
        opts = self.options(options, **kwargs)
        route, progs, params, ctl, inputs, slots = self._start([prompt], opts)
        st = progs.prefill(params, *inputs, slots=slots)
        ctl = self._costed(progs, st, ctl, "step")
        sent = 0
        while True:
            length, done = jax.device_get((st.length[0], st.done[0]))
            if length > sent:
                yield jax.device_get(st.out[0, sent:length]).tolist()
                sent = int(length)
            if done:
                break
            st = progs.step(params, st, ctl)
        out, counts = jax.device_get((st.out[0, :sent], st.stats))
        self.last_stats = _stats(opts.mode, route, counts, [out.tolist()],
                                 time.perf_counter() - t0)


class BatchRun:
    """One batch in flight: `advance()` runs a round and returns each row's new ids; rows
    stop on their own (EOS, max_new_tokens) or by `evict`; in a speculative batch `insert`
    puts a new prompt into a free row, which joins at the next round. Not thread-safe (one
    driver)."""

    def __init__(self, decoder: Decoder, opts: DecodeOptions, route: Route, progs: Programs,
                 params: dict, ctl: Control, st: Any):
        self._decoder = decoder
        self.opts, self.route, self._progs = opts, route, progs
        self._params, self._ctl = params, ctl
        self._st = st
        self._t0 = time.perf_counter()
        self._sent = np.zeros(st.length.shape[0], np.int64)
        self.done = np.zeros(st.length.shape[0], bool)
        self.tokens: list[list[int]] = [[] for _ in range(st.length.shape[0])]
        self._first = True
        self._first_rows: set[int] = set()

    def advance(self, drafts: int | None = None) -> list[list[int]]:
        """New ids per row since the last call (the prefill's first token on the first, and
        on a row's first after `insert`). `drafts` (speculative): draft exactly that many
        tokens this round (0: a plain full-model step) instead of what the policy picks."""
        ctl = self._ctl
        if drafts is not None:
            if self.route.kind != "speculative" or not 0 <= drafts <= self._progs.max_draft:
                raise DecodeError(f"drafts must be in 0..{self._progs.max_draft} and only for "
                                  f"a speculative batch, got {drafts!r}")
            ctl = ctl.replace(force_drafts=jnp.asarray(drafts, jnp.int32))
        if not self._first and not self.done.all() and not self._first_rows:
            self._st = self._progs.step(self._params, self._st, ctl)
        self._first = False
        self._first_rows.clear()
        length, done = jax.device_get((self._st.length, self._st.done))
        out = None
        new: list[list[int]] = []
        for i, n in enumerate(length):
            if n > self._sent[i]:
                if out is None:
                    out = jax.device_get(self._st.out)
                new.append(out[i, self._sent[i]:n].tolist())
                self.tokens[i] += new[-1]
                self._sent[i] = n
            else:
                new.append([])
        self.done = np.array(done, bool)  # a writable copy (evict / insert update it)
        return new

    @property
    def joinable(self) -> bool:
        """Whether rows can be replaced mid-batch (speculative: per-row cache lengths)."""
        return self.route.kind == "speculative"

    def evict(self, row: int) -> None:
        """Stop row `row` now (its request ended on the host side: a stop string, ...)."""
        self._st = self._st.replace(done=self._st.done.at[row].set(True))
        self.done[row] = True

    def insert(self, row: int, prompt: Sequence[int]) -> None:
        """Decode `prompt` in row `row` from the next round on (the row must be done)."""
        if not self.joinable:
            raise DecodeError("only speculative batches take new rows mid-batch")
        _, _, _, _, inputs, slots = self._decoder._start([prompt], self.opts)
        one = self._progs.prefill(self._params, *inputs, slots=slots)
        self._st = self._progs.insert(self._st, one, jnp.asarray(row, jnp.int32))
        self._sent[row] = 0
        self.tokens[row] = []
        self.done[row] = False
        self._first_rows.add(row)

    def stats(self) -> DecodeStats:
        return _stats(self.opts.mode, self.route, jax.device_get(self._st.stats), self.tokens,
                      time.perf_counter() - self._t0)


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _stats(mode: str, route: Route, raw: Any, tokens: list[list[int]], seconds: float
           ) -> DecodeStats:
    """Typed statistics of a run from its device counters (`state.LadderCounts` /
    `SpecCounts`, fetched to the host)."""
    total = sum(len(t) for t in tokens)
    if isinstance(raw, LadderCounts):
        if len(route.bounds) == 1:
            return FixedStats(mode, total, seconds, layers=route.bounds[0][1])
        hist = [int(x) for x in raw.exit_hist]
        layers = [b for _, b in route.bounds]
        return EarlyExitStats(
            mode, total, seconds, avg_exit_layer=float(raw.exit_layer_sum) / max(sum(hist), 1),
            exit_histogram=dict(zip(layers, hist, strict=True)),
            thresholds=tuple(route.thresholds), ladder_steps=int(raw.paths[0]),
            one_loop_steps=int(raw.paths[1]), unchecked_steps=int(raw.paths[2]))
    drafted, rounds, accepted = int(raw.drafted), int(raw.rounds), int(raw.accepted)
    return SpeculativeStats(
        mode, total, seconds, draft_layer=route.bounds[0][1], drafted=drafted,
        accepted=accepted, acceptance_rate=accepted / drafted if drafted else 0.0,
        committed_drafts=int(raw.committed_drafts), full_passes=rounds + 1,
        committed_per_row=tuple(int(x) for x in raw.row_committed),
        rounds_per_row=tuple(int(x) for x in raw.row_rounds),
        draft_passes=int(raw.draft_passes), plain_rounds=int(raw.plain_rounds),
        tokens_per_full_pass=total / (sum(int(x) for x in raw.row_rounds) + len(tokens)))


def generate(params: dict, config: LlamaConfig, prompts: Sequence[Sequence[int]],
             **kwargs: Any) -> GenerationResult:
    """One-shot `Decoder(params, config).generate(prompts, **kwargs)`."""
    dec_keys = ("dtype", "cache_dtype", "attention_impl", "max_draft", "ee_chunk",
                "pad_multiple", "spec_commit", "speculation", "spec_costs", "ee_min_saving",
                "compiler_options")
    dec_kw = {k: kwargs.pop(k) for k in dec_keys if k in kwargs}
    return Decoder(params, config, **dec_kw).generate(prompts, **kwargs)
