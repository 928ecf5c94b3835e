"""One exit of a sorted_jax model as an lm-evaluation-harness model (`lm_eval`, optional extra).

    lm = ExitLM(params, config, tok, mode="fixed", exit_layer=8, batch_size=8)
    lm.loglikelihood_tokens([(context_ids, continuation_ids), ...])  # [(log p, is greedy)]
    lm.generate([context_ids, ...], until=["\\n"], max_gen_toks=32)  # texts, not yet cut
    harness = harness_model(lm)            # an `lm_eval.api.model.TemplateLM` around it
    lm_eval.simple_evaluate(model=harness, tasks=[...])

What a request sees (`mode`, as `decoding.DecodeOptions` takes it):

* ``fixed`` (exit k): layers 1..k + the shared final norm and head (an SFT+ICT dir: pass
  `heads.exit_model`'s params, whose head is exit k's own) for scoring and generating.
* ``early-exit`` (exits e1 < ... < em, thresholds): each position is scored with the first
  exit whose top-1 probability reaches its threshold (the last always accepts): the
  distribution early-exit decoding picks that position's token from. Generation is the
  `Decoder`'s early exit.
* ``speculative`` (draft depth k): the output distribution is the full model's, so scores are
  the full model's; generation is the `Decoder`'s self-speculative decoding (greedy: the full
  model's tokens, drafted by the first k layers).

Requests are handled as the harness's own `hf` model (`lm_eval.models.huggingface.HFLM`)
handles them, so both give the same numbers on the same weights (`tests/test_lm_eval.py`):
a string is BOS (when the tokenizer wants one) + its ids; a loglikelihood input is
`(context + continuation)[-(max_length + 1):][:-1]`, its last len(continuation) positions
scored; rolling loglikelihood uses the harness's disjoint windows; a generation context is
left-truncated to `max_length - max_gen_toks`, stops at EOS and is cut at the first `until`
string (EOS's text added). `max_length` is the model's context. Text is always plain text:
a literal "</s>" in a prompt is not the EOS id (`data.tokenizers`).

Scoring runs one forward pass per batch over the whole sequence (`run_layer_range` over the
stored stack: exactly the layers the exit needs, no copy of the weights), right-padded;
rows are sorted by length, a batch always has `batch_size` rows (a short last one is filled
with copies) and its length is rounded up to a bucket (32, 64, 128, ... up to max_length), so a
whole run compiles a few shapes. Generation runs the `Decoder` round by round (`BatchRun`),
left-padded, and stops a row as soon as its text holds a stop string.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax import decoding
from sorted_jax.core.errors import EvalError
from sorted_jax.data import Tokenizer
from sorted_jax.data.tokenizers import bos_prefix
from sorted_jax.decoding.sampling import top1_prob
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.modeling import Llama, make_model, run_layer_range

INSTALL_HINT = 'pip install -e ".[lm-eval]"'
NOT_INSTALLED = f"lm-eval (the lm-evaluation-harness) is not installed; run: {INSTALL_HINT}"
PAD_MULTIPLE = 32  # generation prompts are left-padded to a multiple of this
FIRST_BUCKET = 32  # scored lengths: 32, 64, 128, ... and max_length


def length_bucket(n: int, max_length: int) -> int:
    """The padded length of a scored row of n tokens: the next power-of-two multiple of
    FIRST_BUCKET, or max_length when that is shorter."""
    b = FIRST_BUCKET
    while b < n:
        b *= 2
    return min(b, max_length)


def _freeze(x: Any) -> Any:
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    return tuple(_freeze(v) for v in x) if isinstance(x, (list, tuple)) else x


def _score(model: Llama, stops: tuple[int, ...], params: dict, thresholds: jax.Array,
           ids: jax.Array, lengths: jax.Array, targets: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
    """(log p(target) [B, T], target is the argmax [B, T]) of right-padded rows `ids` whose
    first `lengths` tokens are real. One exit (stops = (k,)) or an early-exit ladder: each
    position takes the first exit whose top-1 probability reaches its threshold."""
    mask = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
    h = model.apply({"params": params}, ids, method=Llama.embed)
    tok_lp = jnp.zeros(ids.shape, jnp.float32)
    greedy = jnp.zeros(ids.shape, bool)
    decided = jnp.zeros(ids.shape, bool)
    start = 0
    for j, stop in enumerate(stops):
        h, _ = run_layer_range(model, params, h, start, stop, attention_mask=mask)
        start = stop
        logits = model.apply({"params": params}, h, method=Llama.head)
        take = ~decided
        if j < len(stops) - 1:
            take &= top1_prob(logits) >= thresholds[j]
        # log p(target) without a [B, T, V] log-softmax beside the logits
        lp = (jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
              - jax.nn.logsumexp(logits, axis=-1))
        tok_lp = jnp.where(take, lp, tok_lp)
        greedy = jnp.where(take, jnp.argmax(logits, axis=-1) == targets, greedy)
        decided |= take
    return tok_lp, greedy


# Compiled scorers, shared by every ExitLM of the same model shape, dtype and exits
# (thresholds are traced: changing them compiles nothing).
_SCORERS: dict[tuple, Callable] = {}


def _scorer(config: LlamaConfig, dtype: Any, stops: tuple[int, ...]) -> Callable:
    key = (_freeze(config.to_hf_dict()), jnp.dtype(dtype).name, stops)
    if key not in _SCORERS:
        model = make_model(config, dtype=dtype)
        _SCORERS[key] = jax.jit(functools.partial(_score, model, stops))
    return _SCORERS[key]


class ExitLM:
    """Scoring and generation of one model at one exit (or early-exit / speculative), in the
    harness's request semantics but without the harness (module doc)."""

    def __init__(self, params: dict, config: LlamaConfig, tokenizer: Tokenizer,
                 options: decoding.DecodeOptions | None = None, *, dtype: Any = jnp.float32,
                 batch_size: int = 8, max_gen_toks: int = 256, name: str = "", **kwargs: Any):
        """`options` (or `DecodeOptions`' fields as keywords: mode, exit_layer, exits,
        thresholds, draft_layer, seed) say what runs; their sampling and length fields are
        replaced per generation request."""
        if batch_size < 1:
            raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
        self.options = decoding.Decoder.options(options, **kwargs)
        self.route = self.options.route(config)  # a DecodeError names a layer out of range
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.batch_size, self.max_gen_toks, self.name = batch_size, max_gen_toks, name
        self.dtype = jnp.dtype(dtype)
        self.max_length = config.max_position_embeddings
        if self.route.kind == "speculative":  # the full model's distribution
            stops, th = (config.num_hidden_layers,), ()
        else:
            stops, th = tuple(b for _, b in self.route.bounds), self.route.thresholds
        self.score_fn = _scorer(config, self.dtype, stops)
        self.thresholds = jnp.asarray([*th, 0.0], jnp.float32)  # the last exit accepts
        self.decoder = decoding.Decoder(params, config, dtype=dtype, pad_multiple=PAD_MULTIPLE)
        self.stop_ids = decoding.stop_ids(config, tokenizer.eos_id)
        self.stats: decoding.DecodeStats | None = None  # all generate calls' statistics

    # -- tokens ----------------------------------------------------------------------------
    @property
    def eot_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def prefix_id(self) -> int:
        """What an empty context is conditioned on: BOS, else EOS (as the `hf` model)."""
        bos = self.tokenizer.bos_id
        return int(bos) if bos is not None else self.eot_id

    def encode(self, text: str, special: bool = True) -> list[int]:
        return (bos_prefix(self.tokenizer) if special else []) + list(
            self.tokenizer.encode(text))

    def eos_text(self) -> str | None:
        """EOS as text, as the `hf` model adds it to the stop strings (None: no text)."""
        tok = self.tokenizer
        hf = getattr(tok, "hf", None)
        if hf is not None:
            return hf.decode([tok.eos_id], skip_special_tokens=False)
        piece = getattr(tok, "piece", None)
        return piece(tok.eos_id) if piece is not None else None

    # -- loglikelihood -----------------------------------------------------------------------
    def loglikelihood_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
                             ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), every continuation token is the argmax)
        per (context ids, continuation ids); the context must not be empty."""
        rows = []
        for ctx, cont in requests:
            if not ctx or not cont:
                raise EvalError("a loglikelihood request needs a context and a continuation")
            if len(cont) > self.max_length:
                raise EvalError(f"a continuation of {len(cont)} tokens exceeds the model's "
                                f"context of {self.max_length}")
            whole = [*ctx, *cont][-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], len(cont)))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        b = self.batch_size
        for start in range(0, len(order), b):
            chunk = order[start:start + b]
            t = length_bucket(len(rows[chunk[0]][0]), self.max_length)
            ids = np.zeros((b, t), np.int32)
            tgt = np.zeros((b, t), np.int32)
            lengths = np.zeros((b,), np.int32)
            for r in range(b):  # rows past the chunk repeat its first one
                inp, target, _ = rows[chunk[r] if r < len(chunk) else chunk[0]]
                ids[r, :len(inp)], tgt[r, :len(inp)], lengths[r] = inp, target, len(inp)
            lp, greedy = jax.device_get(self.score_fn(
                self.params, self.thresholds, jnp.asarray(ids), jnp.asarray(lengths),
                jnp.asarray(tgt)))
            for r, i in enumerate(chunk):
                n, m = int(lengths[r]), rows[i][2]
                out[i] = (float(lp[r, n - m:n].sum()), bool(greedy[r, n - m:n].all()))
        return out

    # -- generation --------------------------------------------------------------------------
    def generate(self, contexts: Sequence[Sequence[int]], *, until: Sequence[str] = (),
                 max_gen_toks: int | None = None, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0) -> list[str]:
        """Text generated after each context (left-truncated to leave room for max_gen_toks)
        up to EOS or max_gen_toks; a row stops early once its text holds a string of `until`
        (the text is returned uncut: the caller cuts it)."""
        n_new = self.max_gen_toks if max_gen_toks is None else int(max_gen_toks)
        room = self.max_length - n_new
        if room <= 0:
            raise EvalError(f"max_gen_toks={n_new} leaves no room for a prompt in the model's "
                            f"context of {self.max_length}")
        opts = self.options.replace(max_new_tokens=n_new, temperature=float(temperature),
                                    top_k=int(top_k), top_p=float(top_p), eos_id=self.stop_ids)
        ctxs = [list(c)[-room:] or [self.prefix_id] for c in contexts]
        stops = [s for s in until if s]
        out = [""] * len(ctxs)
        order = sorted(range(len(ctxs)), key=lambda i: -len(ctxs[i]))
        b = self.batch_size
        for start in range(0, len(order), b):
            chunk = order[start:start + b]
            prompts = [ctxs[i] for i in chunk] + [ctxs[chunk[0]]] * (b - len(chunk))
            run = self.decoder.start(prompts, opts)
            for r in range(len(chunk), b):
                run.evict(r)
            while True:
                run.advance()
                for r in range(len(chunk)):
                    if not run.done[r] and stops and any(
                            s in self._text(run.tokens[r]) for s in stops):
                        run.evict(r)
                if run.done[:len(chunk)].all():
                    break
            stats = run.stats()
            self.stats = stats if self.stats is None else self.stats.merge(stats)
            for r, i in enumerate(chunk):
                out[i] = self._text(run.tokens[r])
        return out

    def _text(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids)

    def info(self) -> dict[str, Any]:
        """What the harness records as the model (its results' `config`)."""
        return {"model_name": self.name, "mode": self.options.mode,
                "layers": [b for _, b in self.route.bounds],
                "num_hidden_layers": self.config.num_hidden_layers, "dtype": self.dtype.name,
                "max_length": self.max_length}


def stats_dict(stats: decoding.DecodeStats | None) -> dict[str, Any]:
    """The JSON-able statistics of a run's generations ({} when nothing was generated)."""
    if stats is None:
        return {}
    d = {k: v for k, v in vars(stats).items() if k not in ("committed_per_row",
                                                            "rounds_per_row")}
    return json.loads(json.dumps(d, default=str))


# ---------------------------------------------------------------------------------------------
# the harness's side


def require_lm_eval() -> None:
    """Raise `EvalError` (with the pip command) when lm-eval cannot be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(NOT_INSTALLED) from None


def harness_model(lm: ExitLM) -> Any:
    """`lm` as an `lm_eval.api.model.TemplateLM`, ready for `lm_eval.simple_evaluate`."""
    require_lm_eval()
    return _harness_class()(lm)


@functools.cache
def _harness_class() -> type:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import (
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )

    class SortedJaxLM(TemplateLM):
        """The harness's view of an `ExitLM` (requests in, numbers and texts out)."""

        def __init__(self, lm: ExitLM):
            super().__init__()
            self.lm = lm

        @property
        def eot_token_id(self) -> int:
            return self.lm.eot_id

        @property
        def prefix_token_id(self) -> int:
            return self.lm.prefix_id

        @property
        def max_length(self) -> int:
            return self.lm.max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       **kwargs: Any) -> list[int]:
            return self.lm.encode(string, special=add_special_tokens is not False)

        def get_model_info(self) -> dict[str, Any]:
            return self.lm.info()

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                                  **kwargs: Any) -> list[tuple[float, bool]]:
            res = self.lm.loglikelihood_tokens([(ctx, cont) for _, ctx, cont in requests])
            for (key, _, _), ans in zip(requests, res, strict=True):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, ans)
            return res

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False
                                  ) -> list[float]:
            windows, counts = [], []
            for (string,) in [r.args for r in requests]:
                w = [lm_utils.make_disjoint_window(x) for x in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                windows += w
                counts.append(len(w))
            scores = self.lm.loglikelihood_tokens(windows)
            out, i = [], 0
            for req, n in zip(requests, counts, strict=True):
                out.append(sum(s for s, _ in scores[i:i + n]))
                i += n
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, out[-1])
            return out

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str),
                                  []).append(i)
            out = [""] * len(requests)
            eos = self.lm.eos_text()
            for idx in groups.values():
                kw = normalize_gen_kwargs(requests[idx[0]].args[1], self.lm.max_gen_toks)
                until = handle_stop_sequences(kw.pop("until", None), eos=eos)
                sample = bool(kw.get("do_sample")) and float(kw.get("temperature") or 0) > 0
                texts = self.lm.generate(
                    [self.tok_encode(requests[i].args[0]) for i in idx], until=until,
                    max_gen_toks=kw["max_gen_toks"],
                    temperature=float(kw.get("temperature") or 0) if sample else 0.0,
                    top_k=int(kw.get("top_k") or 0) if sample else 0,
                    top_p=float(kw.get("top_p") or 1.0) if sample else 1.0)
                for i, text in zip(idx, texts, strict=True):
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
            return out

    return SortedJaxLM
