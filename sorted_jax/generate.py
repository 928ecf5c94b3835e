"""Generate text with a SoFT checkpoint: any exit, early exit, or self-speculative decoding.

    python -m sorted_jax.generate --ckpt DIR --prompt "Name three colors."
    python -m sorted_jax.generate --ckpt DIR --prompts in.jsonl --out out.jsonl \\
        --mode speculative --draft-layer 12

`--ckpt` is a model dir or a training workdir (`sorted_jax.io.artifacts.inspect`). A single
`--prompt` streams tokens to stdout; `--prompts` (JSONL, one record per line: {"instruction",
"input"}, {"prompt"} or, with `--template chat`, {"messages"}) writes one JSONL result per
record to `--out` (or stdout). Statistics (tokens/s, average exit layer, acceptance rate,
full-model passes) go to stderr. `--out` is checked before the model is loaded: not a dir, not
an input, and an existing file only if it holds generate's own lines and `--overwrite` is given;
it is written to a temp sibling and renamed when complete.

`--template` defaults to the one the checkpoint was trained with (its recorded train config),
or `none` (the prompt as it is) for a model with no training record, e.g. one converted from
HF. `--template chat` uses the tokenizer's own chat template (`--system` adds a system turn).
Decoding stops at any of the model's EOS ids (config.json / generation_config.json may list
several) and at the tokenizer's EOS.

The decoding engine is `sorted_jax.decoding` (`Decoder`, `DecodeOptions`); reading the prompts,
the flags' options, batching and the result lines are `sorted_jax.decoding.batch_job`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from sorted_jax.core.errors import UsageError, run_cli
from sorted_jax.data import PROMPT_TEMPLATES, Tokenizer, prompt_ids
from sorted_jax.decoding import MODES, PAPER_THRESHOLDS, Decoder, stop_ids
from sorted_jax.decoding import batch_job as job
from sorted_jax.io import artifacts, destinations
from sorted_jax.model.modeling import DTYPES

__all__ = ["build_parser", "main", "run"]

TEMPLATES = PROMPT_TEMPLATES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sorted_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="model dir or training workdir")
    p.add_argument("--step", type=int, default=None, help="workdir step (default: latest)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer spec (builtin, a .model file, a dir); default: the ckpt's")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (the instruction, with --template alpaca)")
    src.add_argument("--prompts", help="JSONL file of {instruction[, input]}, {prompt} or "
                     "(--template chat) {messages}")
    p.add_argument("--template", default=None, choices=TEMPLATES,
                   help="prompt template (default: the checkpoint's training template, else "
                        "none); chat = the tokenizer's chat template")
    p.add_argument("--system", default=None,
                   help="system prompt (with --template chat)")
    p.add_argument("--mode", default="fixed", choices=MODES)
    p.add_argument("--exit-layer", type=int, default=None,
                   help="fixed mode: sub-model depth k (default: the full model)")
    p.add_argument("--exits", nargs="+", default=None,
                   help="early-exit: exit layers in order (default: the checkpoint's trained "
                        "exits, as serve and evaluate use)")
    p.add_argument("--thresholds", nargs="+", default=None,
                   help="early-exit: top-1 prob thresholds of all exits but the last "
                        f"(default {', '.join(map(str, PAPER_THRESHOLDS))})")
    p.add_argument("--draft-layer", type=int, default=None,
                   help="speculative: draft depth (default: the first trained exit)")
    p.add_argument("--max-draft", type=int, default=8, help="speculative: largest draft window")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch for --prompts")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute / params dtype")
    p.add_argument("--out", default=None, help="JSONL output file (default stdout for --prompts)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of generate at --out")
    return p


COMMAND = "sorted_jax.generate"


# A file of generate's JSON lines: its first line is one of them.
_is_generate_output = destinations.jsonl_with_keys("output", "tokens", "finish_reason")


def _claim_out(args: argparse.Namespace) -> destinations.Destination | None:
    """--out, checked before the model is loaded: a file, not an input, not someone else's."""
    if not args.out:
        return None
    return destinations.claim_file(args.out, flag="--out", command=COMMAND,
                                   inputs=[args.ckpt, args.prompts, args.tokenizer],
                                   overwrite=args.overwrite, recognise=_is_generate_output)


def _template(args: argparse.Namespace, art: artifacts.Artifact) -> str:
    """--template, else the checkpoint's training template, else none (a converted model)."""
    template = args.template or art.settings.template or "none"
    if template not in TEMPLATES:
        raise UsageError(f"{art.path} was trained with template {template!r}, which generate "
                         f"does not know; pass --template (one of {', '.join(TEMPLATES)})")
    if args.system is not None and template != "chat":
        raise UsageError(f"--system needs --template chat (the template is {template!r})")
    return template


def _load(args: argparse.Namespace) -> tuple[dict, Any, Tokenizer, Any, str, tuple]:
    art = artifacts.inspect(args.ckpt)
    template = _template(args, art)
    tokenizer = art.tokenizer(args.tokenizer)
    dtype = DTYPES[args.dtype]
    return (art.load_params(step=args.step, dtype=dtype), art.config, tokenizer, dtype,
            template, art.default_exits())


def run(args: argparse.Namespace) -> None:
    dest = _claim_out(args)
    params, config, tok, dtype, template, exits = _load(args)
    opts = job.options_from_flags(
        args.mode, exit_layer=args.exit_layer, exits=args.exits, thresholds=args.thresholds,
        draft_layer=args.draft_layer, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    opts = opts.replace(eos_id=stop_ids(config, tok.eos_id)).with_trained_exits(
        exits, config.num_hidden_layers)
    dec = Decoder(params, config, dtype=dtype, max_draft=args.max_draft, pad_multiple=64)
    dec.route(opts)  # bad layers / thresholds fail before any prompt is read
    records = ([{"prompt": args.prompt}] if args.prompt is not None
               else job.read_prompt_records(args.prompts))
    ids = [prompt_ids(tok, r, template, args.system) for r in records]
    opts = opts.replace(max_len=job.cache_length(ids, args.max_new_tokens))
    t0 = time.perf_counter()
    with (destinations.atomic_file(dest) if dest is not None
          else contextlib.nullcontext(None)) as out_f:
        if args.prompt is not None:
            made = job.stream_text(dec, opts, ids[0], tok)
            total = dec.last_stats
            if out_f is not None:
                out_f.write(json.dumps(job.result_line(records[0], tok, made, opts)) + "\n")
        else:
            total = job.decode_in_batches(dec, opts, ids, records, tok, args.batch_size,
                                          out_f or sys.stdout)
    print(job.summary(total, time.perf_counter() - t0), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("sorted_jax.generate", run, args)


if __name__ == "__main__":
    sys.exit(main())
