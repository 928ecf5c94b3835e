"""`python -m sorted_jax.serve --ckpt DIR [--host 127.0.0.1 --port 8000]`: one SoFT checkpoint
behind an OpenAI-compatible HTTP API, every compute budget per request.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (the
tokenizer's chat template where it has one, else a plain "role: content" transcript), SSE
streaming (`stream: true`) or one JSON response; `max_tokens`, `temperature` (default 1,
0 = greedy), `top_p`, `stop`, `seed`, `n` (1 only), `usage` with token counts. sorted_jax's
own fields, in the request body (the `openai` client's `extra_body`): `mode` (`fixed` |
`early-exit` | `speculative`; default fixed, or the mode the other fields imply),
`exit_layer` (fixed depth), `exits` (default: the checkpoint's trained exits) and
`thresholds` (early exit), `draft_layer` (speculative; default: the first trained exit). Every
response carries `sorted_jax`: the mode, layers per token and, for speculative decoding, the
acceptance.

The HTTP app is `sorted_jax.serving.app` (requests read by `sorted_jax.serving.requests`);
batching, the bounded queue (429), per-request timeouts (504) and shutdown live in
`sorted_jax.serving.scheduler`. SIGTERM (or Ctrl-C) stops accepting connections, lets
in-flight requests finish (up to `--graceful-s`), then ends the worker. FastAPI and uvicorn
are imported only when the server starts (`pip install -e ".[serve]"`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from sorted_jax.core.errors import UserError, run_cli
from sorted_jax.decoding import MODES, DecodeOptions, Decoder, stop_ids
from sorted_jax.io import artifacts
from sorted_jax.model.modeling import DTYPES
from sorted_jax.serving.app import (
    build_app,
    listen_socket,
    require_server_packages,
    serve_app,
)
from sorted_jax.serving.scheduler import Scheduler, ServeSettings

__all__ = ["build_parser", "main", "run"]

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sorted_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="model dir or training workdir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the id /v1/models reports "
                   "(default: the checkpoint dir's name)")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the ckpt's)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--max-batch", type=int, default=16, help="rows per batch")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    p.add_argument("--graceful-s", type=float, default=30.0,
                   help="on SIGTERM, how long in-flight requests may still run")
    p.add_argument("--max-draft", type=int, default=8, help="speculative: largest window")
    p.add_argument("--speculation", default="dynamic", choices=("dynamic", "always"),
                   help="speculative: draft only when it pays (measured per batch shape), or "
                        "every round (the old behaviour)")
    p.add_argument("--ee-min-saving", type=float, default=0.0,
                   help="early exit: a batch checks its exits while they skip this fraction of "
                        "the layers, else runs full-depth stretches (tokens then depend on the "
                        "batch); 0 = check every token, the paper's rule (default)")
    p.add_argument("--warmup", default="",
                   help="comma-separated MODE[:LAYER] (e.g. fixed,fixed:4,early-exit,"
                        "speculative:4; LAYER = exit_layer / draft_layer) whose greedy programs "
                        "to compile for every batch bucket before serving (other settings "
                        "compile on first use)")
    p.add_argument("--fast-compile", action="store_true",
                   help="XLA's cheap optimisation level (tiny models, tests)")
    return p


def run(args: argparse.Namespace) -> None:
    require_server_packages()
    sock = listen_socket(args.host, args.port)  # a busy port fails now, before any loading
    art = artifacts.inspect(args.ckpt)
    tokenizer = art.tokenizer(args.tokenizer)
    dtype = DTYPES[args.dtype]
    params = art.load_params(dtype=dtype)
    if args.max_batch < 1 or args.max_queue < 0 or args.timeout_s <= 0:
        raise UserError("--max-batch must be >= 1, --max-queue >= 0 and --timeout-s > 0")
    settings = ServeSettings(max_batch=args.max_batch, max_queue=args.max_queue,
                             timeout_s=args.timeout_s)
    dec = Decoder(params, art.config, dtype=dtype, max_draft=args.max_draft,
                  pad_multiple=settings.pad_multiple, speculation=args.speculation,
                  ee_min_saving=args.ee_min_saving,
                  compiler_options=FAST_COMPILE if args.fast_compile else None)
    scheduler = Scheduler(dec, tokenizer, settings, stop_ids(art.config, tokenizer.eos_id))
    if args.warmup:
        warm = _warmup_options(args.warmup, art.config, art.default_exits())
        t0 = time.perf_counter()
        warmed = scheduler.warmup(warm)
        print(f"sorted_jax.serve: warmed {warmed} programs in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr, flush=True)
    name = args.model_name or art.path.name
    app = build_app(scheduler, tokenizer, art.config, name, art.default_exits())
    print(f"sorted_jax.serve: {name} on http://{args.host}:{args.port}/v1", file=sys.stderr,
          flush=True)
    serve_app(app, sock, args.graceful_s)
    print("sorted_jax.serve: stopped", file=sys.stderr, flush=True)


def _warmup_options(text: str, config: Any, exits: Sequence[int]) -> list[DecodeOptions]:
    """`--warmup`'s MODE[:LAYER] list as greedy options, each checked against the model."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        mode, _, layer = item.partition(":")
        if mode not in MODES:
            raise UserError(f"--warmup: unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if layer and (mode == "early-exit" or not layer.isdigit()):
            raise UserError(f"--warmup {item!r}: LAYER is an integer, for fixed / speculative")
        k = int(layer) if layer else None
        opts = DecodeOptions(mode=mode, temperature=0.0,
                             exit_layer=k if mode == "fixed" else None,
                             draft_layer=k if mode == "speculative" else None
                             ).with_trained_exits(exits, config.num_hidden_layers)
        try:
            opts.route(config)
        except UserError as e:
            raise e.prefixed(f"--warmup {item!r}: ") from None
        out.append(opts)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("sorted_jax.serve", run, args)


if __name__ == "__main__":
    sys.exit(main())
