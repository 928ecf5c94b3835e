"""A decoding job over prompt records, as `python -m sorted_jax.generate` runs it: the
records of a prompts file, the `DecodeOptions` the decoding flags describe, one KV cache length
for the whole job, decoding in batches (or one prompt streamed as it grows), one JSON result
line per record and the statistics' summary line.

Errors name the command's flags and files (`UsageError`, `DataError`, `MissingFileError`),
since what is wrong is what the user typed.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from sorted_jax.core.args import parse_numbers
from sorted_jax.core.errors import DataError, MissingFileError, UsageError
from sorted_jax.data.records import iter_jsonl
from sorted_jax.data.tokenizers import Tokenizer
from sorted_jax.decoding.engine import Decoder
from sorted_jax.decoding.options import DecodeOptions
from sorted_jax.decoding.results import (
    DecodeStats,
    EarlyExitStats,
    GenerationResult,
    SpeculativeStats,
)

__all__ = ["cache_length", "decode_in_batches", "options_from_flags", "read_prompt_records",
           "result_line", "stream_text", "summary"]

PROMPT_KEYS = frozenset({"prompt", "instruction", "messages", "conversations"})


def read_prompt_records(path: str) -> list[dict[str, Any]]:
    """The `--prompts` JSONL's records: objects with a prompt, an instruction or messages (a
    bare string is a prompt); string fields must be strings, and the file must hold one."""
    f = Path(path)
    if f.is_dir():
        raise DataError(f"--prompts {path} is a directory; give the JSONL file itself")
    if not f.is_file():
        raise MissingFileError(f"--prompts file {path} does not exist")
    records = []
    for n, rec in iter_jsonl(f):
        if isinstance(rec, str):
            rec = {"prompt": rec}
        if not isinstance(rec, dict) or not (PROMPT_KEYS & set(rec)):
            raise DataError(f"{path}:{n}: expected an object with 'instruction' (and optional "
                            "'input'), 'prompt' or (chat template) 'messages'")
        bad = [k for k in ("prompt", "instruction", "input") if k in rec
               and not isinstance(rec[k], str)]
        if bad:
            raise DataError(f"{path}:{n}: field {bad[0]!r} is a {type(rec[bad[0]]).__name__}, "
                            "expected a string")
        records.append(rec)
    if not records:
        raise DataError(f"--prompts file {path} holds no records")
    return records


def options_from_flags(mode: str, *, exit_layer: int | None, exits: Sequence[str] | None,
                       thresholds: Sequence[str] | None, draft_layer: int | None,
                       max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                       seed: int) -> DecodeOptions:
    """The request the decoding flags describe; a flag of another mode is refused rather than
    silently ignored. `exits` / `thresholds` are the flags' raw values (commas or spaces)."""
    if exit_layer is not None and mode != "fixed":
        raise UsageError("--exit-layer applies to --mode fixed (use --exits for early-exit, "
                         "--draft-layer for speculative)")
    if draft_layer is not None and mode != "speculative":
        raise UsageError("--draft-layer applies to --mode speculative")
    if (exits or thresholds) and mode != "early-exit":
        raise UsageError("--exits / --thresholds apply to --mode early-exit")
    return DecodeOptions(
        mode=mode, exit_layer=exit_layer,
        exits=parse_numbers(exits, int, "--exits must be layer numbers"),
        thresholds=parse_numbers(thresholds, float, "thresholds must be numbers"),
        draft_layer=draft_layer, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def cache_length(prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 multiple: int = 64) -> int:
    """KV cache slots for the whole job (the longest prompt and the new tokens, each rounded up
    to `multiple`), so every batch reuses one compiled program."""
    longest = max(len(p) for p in prompts)
    return int(math.ceil(longest / multiple) * multiple
               + math.ceil(max_new_tokens / multiple) * multiple)


def result_line(record: dict[str, Any], tokenizer: Tokenizer, tokens: list[int],
                options: DecodeOptions) -> dict[str, Any]:
    """The record with its output text, tokens, why it stopped (`eos` | `length`) and mode."""
    stops = options.eos_id
    stops = () if stops is None else (stops,) if isinstance(stops, int) else stops
    finished = bool(tokens) and tokens[-1] in stops
    return {**record, "output": tokenizer.decode(tokens), "tokens": tokens,
            "finish_reason": "eos" if finished else "length", "mode": options.mode}


def stream_text(decoder: Decoder, options: DecodeOptions, ids: list[int],
                tokenizer: Tokenizer, out: TextIO | None = None) -> list[int]:
    """Decode one prompt, writing its text to `out` (default stdout) as it grows; returns the
    new ids. The decoder's `last_stats` then holds its statistics."""
    out = sys.stdout if out is None else out
    made: list[int] = []
    shown = ""
    for new in decoder.stream(ids, options):
        made += new
        text = tokenizer.decode(made)
        out.write(text[len(shown):])
        out.flush()
        shown = text
    out.write("\n")
    return made


def decode_in_batches(decoder: Decoder, options: DecodeOptions, prompts: list[list[int]],
                      records: list[dict[str, Any]], tokenizer: Tokenizer, batch_size: int,
                      out: TextIO) -> DecodeStats:
    """Decode every prompt, `batch_size` at a time, one JSON result line each to `out`
    (progress to stderr); returns the statistics of all batches."""
    total: DecodeStats | None = None
    for i in range(0, len(prompts), batch_size):
        res: GenerationResult = decoder.generate(prompts[i:i + batch_size], options)
        total = res.stats if total is None else total.merge(res.stats)
        for j, toks in enumerate(res.tokens):
            out.write(json.dumps(result_line(records[i + j], tokenizer, toks, options)) + "\n")
        print(f"[{min(i + batch_size, len(prompts))}/{len(prompts)}]", file=sys.stderr)
    assert total is not None
    return total


def summary(stats: DecodeStats, seconds: float) -> str:
    """One line: tokens and their rate, and the mode's own statistics (exits, acceptance)."""
    parts = [f"{stats.tokens} tokens in {seconds:.2f}s "
             f"({stats.tokens / max(seconds, 1e-9):.1f} tok/s incl. compile)"]
    if isinstance(stats, EarlyExitStats):
        parts.append(f"avg exit layer {stats.avg_exit_layer:.2f}")
        parts.append("exits " + " ".join(f"{k}:{v}" for k, v in stats.exit_histogram.items()))
    if isinstance(stats, SpeculativeStats):
        parts.append(f"acceptance {stats.acceptance_rate:.3f} "
                     f"({stats.accepted}/{stats.drafted} drafts)")
        parts.append(f"full-model passes {stats.full_passes}")
    return "; ".join(parts)
