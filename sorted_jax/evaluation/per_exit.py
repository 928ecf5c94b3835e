"""Decoding at each exit of one model: latency, greedy generations, TriviaQA exact match.

    models = ExitModels(params, config, heads=None)   # heads: an SFT+ICT dir's `IctHeads`
    measure_latency(models, exits=(4, 8), prompt=ids)  # {exit: ms per token}
    generate_at_exit(models, 4, prompts, max_new_tokens=32, batch_size=8, stop_ids=[2])

Exit n runs the first n layers and the final norm + lm_head (`Decoder`, mode fixed), or for an
SFT+ICT model exit n's own head (`heads.exit_model`). Decoders are built once per dtype (any
exit runs through one), or once per (exit, dtype) when each exit has its own head, and reused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from sorted_jax import decoding
from sorted_jax.data import Record, Tokenizer
from sorted_jax.data import prompt_ids as data_prompt_ids
from sorted_jax.data.chat import is_chat_record, validate_messages
from sorted_jax.data.records import record_where
from sorted_jax.evaluation import triviaqa
from sorted_jax.model.config import LlamaConfig
from sorted_jax.objective import heads

PAD_MULTIPLE = 32  # prompt and cache lengths are rounded up to this: few compiled shapes


class ExitModels:
    """One model's decoders at any exit, built on first use and kept."""

    def __init__(self, params: Mapping[str, Any], config: LlamaConfig,
                 ict_heads: heads.IctHeads | None = None):
        self.params, self.config, self.heads = params, config, ict_heads
        self._decoders: dict[tuple[int | None, str], Any] = {}

    def decoder(self, exit_layer: int, dtype: Any) -> Any:
        key = (exit_layer if self.heads is not None else None, jnp.dtype(dtype).name)
        if key not in self._decoders:
            params, config = heads.exit_model(self.params, self.config, self.heads, exit_layer)
            self._decoders[key] = decoding.Decoder(params, config, dtype=dtype,
                                                   pad_multiple=PAD_MULTIPLE)
        return self._decoders[key]


def _cache_len(prompts: Sequence[Sequence[int]], new_tokens: int) -> int:
    def up(n: int) -> int:
        return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE

    return up(max(len(p) for p in prompts)) + up(new_tokens)


def measure_latency(models: ExitModels, exits: Sequence[int], prompt: Sequence[int], *,
                    new_tokens: int = 32, repeats: int = 5, dtype: Any = jnp.float32
                    ) -> dict[int, float]:
    """{exit: decode ms per token}, batch 1, greedy, prefill and compilation excluded:
    (time of N new tokens - time of 1) / (N - 1), the best of `repeats`."""
    new_tokens = max(2, new_tokens)
    out = {}
    slots = _cache_len([prompt], new_tokens)
    for e in exits:
        dec = models.decoder(e, dtype)
        kw = dict(mode="fixed", exit_layer=e, eos_id=[], max_len=slots)

        def timed(n: int, dec=dec, kw=kw) -> float:
            t0 = time.perf_counter()
            dec.generate([list(prompt)], max_new_tokens=n, **kw)
            return time.perf_counter() - t0

        timed(new_tokens)  # compile prefill + loop
        short, long = [], []
        for _ in range(repeats):  # interleaved, so load changes hit both alike
            short.append(timed(1))
            long.append(timed(new_tokens))
        per_token = (min(long) - min(short)) / (new_tokens - 1)
        if per_token <= 0:  # timer noise outweighs a few tokens' work: whole-run mean instead
            per_token = min(long) / new_tokens
        out[e] = per_token * 1000.0
    return out


def generate_at_exit(models: ExitModels, exit_layer: int, prompts: Sequence[Sequence[int]], *,
                     max_new_tokens: int, batch_size: int, stop_ids: Sequence[int],
                     dtype: Any = jnp.float32) -> list[list[int] | None]:
    """Greedy continuations (stop id stripped) of every prompt at one exit; None for a prompt
    that leaves no room for `max_new_tokens` in the model's context."""
    dec = models.decoder(exit_layer, dtype)
    room = models.config.max_position_embeddings - max_new_tokens
    fits = [i for i, p in enumerate(prompts) if len(p) <= room]
    out: list[list[int] | None] = [None] * len(prompts)
    if not fits:
        return out
    slots = _cache_len([prompts[i] for i in fits], max_new_tokens)
    stops = set(stop_ids)
    for start in range(0, len(fits), batch_size):
        idx = fits[start:start + batch_size]
        chunk = [list(prompts[i]) for i in idx]
        chunk += [chunk[0]] * (batch_size - len(idx))  # one batch shape: one compiled program
        res = dec.generate(chunk, mode="fixed", exit_layer=exit_layer,
                           max_new_tokens=max_new_tokens, eos_id=list(stop_ids), max_len=slots)
        for i, toks in zip(idx, res.tokens, strict=False):
            out[i] = toks[:-1] if toks and toks[-1] in stops else toks
    return out


def prompt_ids(tok: Tokenizer, record: Record, template: str) -> list[int]:
    """The record's prompt (instruction, input) in `template`, as training sees it (BOS as the
    tokenizer wants it; `data.prompt_ids`)."""
    return data_prompt_ids(tok, record, template)


def generation_case(record: Mapping[str, Any]) -> tuple[Mapping[str, Any], str, str, str]:
    """(prompt record, instruction, input, reference) of an evaluation record. An instruction
    record is its own prompt; a conversation is prompted with its turns before its last
    assistant turn, which is the reference, and its instruction is the last user turn there."""
    if not is_chat_record(record):
        return record, record["instruction"], record.get("input", ""), record.get("output", "")
    msgs = validate_messages(record, record_where(record) or "record", for_training=False)
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    context = msgs[:last]
    user = next((m["content"] for m in reversed(context) if m["role"] == "user"), "")
    return ({"messages": context}, user, "",
            msgs[last]["content"] if last < len(msgs) else "")


def dump_generations(models: ExitModels, tok: Tokenizer, exits: Sequence[int],
                     records: Sequence[Record], f: Any, *, template: str, max_new_tokens: int,
                     batch_size: int, dtype: Any, line: Mapping[str, Any]) -> int:
    """Write one JSON line per (record, exit) to `f` ({**line, id, exit, instruction, input,
    response, reference, finished}, `skipped` when the prompt does not fit the context);
    returns the count. Responses stop at any of the model's EOS ids (`decoding.stop_ids`)."""
    cases = [generation_case(r) for r in records]
    prompts = [prompt_ids(tok, case[0], template) for case in cases]
    stops = decoding.stop_ids(models.config, tok.eos_id)
    n = 0
    for e in exits:
        outs = generate_at_exit(models, e, prompts, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, stop_ids=stops, dtype=dtype)
        for i, ((_, instruction, extra, reference), toks) in enumerate(
                zip(cases, outs, strict=True)):
            row = {"id": i, **line, "exit": e, "instruction": instruction, "input": extra,
                   "response": "" if toks is None else tok.decode(toks),
                   "reference": reference,
                   "finished": toks is not None and len(toks) < max_new_tokens}
            if toks is None:  # the prompt does not fit the model's context
                row["skipped"] = True
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    f.flush()
    return n


def triviaqa_em(models: ExitModels, tok: Tokenizer, exits: Sequence[int], items: Sequence, *,
                max_new_tokens: int, batch_size: int, dtype: Any,
                template: str | None = None) -> dict[int, dict[str, Any]]:
    """{exit: {"em", "num_questions", "predictions"}} with greedy answers cut at a newline."""
    stops = [tok.eos_id, *triviaqa.newline_stop_ids(tok)]
    out = {}
    for e in exits:
        gen: Callable = lambda prompts, e=e: generate_at_exit(
            models, e, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
            stop_ids=stops, dtype=dtype)
        out[e] = triviaqa.evaluate_generations(gen, tok, items, batch_size=len(items),
                                               template=template)
    return out
