"""`python -m sorted_jax.serve --ckpt DIR [--host 127.0.0.1 --port 8000]`: one SoFT checkpoint
behind an OpenAI-compatible HTTP API, every compute budget per request.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (the
tokenizer's chat template where it has one, else a plain "role: content" transcript), SSE
streaming (`stream: true`) or one JSON response; `max_tokens`, `temperature` (default 1,
0 = greedy), `top_p`, `stop`, `seed`, `n` (1 only), `usage` with token counts. sorted_jax's
own fields, in the request body (the `openai` client's `extra_body`): `mode` (`fixed` |
`early-exit` | `speculative`; default fixed, or the mode the other fields imply),
`exit_layer` (fixed depth), `exits` (default: the checkpoint's trained exits) and
`thresholds` (early exit), `draft_layer` (speculative). Every response carries
`sorted_jax`: the mode, layers per token and, for speculative decoding, the acceptance.

Batching, the bounded queue (429), per-request timeouts (504) and shutdown live in
`sorted_jax.serving.scheduler`; this module is the HTTP layer. SIGTERM (or Ctrl-C) stops accepting
connections, lets in-flight requests finish (up to `--graceful-s`), then ends the worker.
FastAPI and uvicorn are imported only when the server starts (`pip install -e ".[serve]"`).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request).

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sorted_jax.core.errors import DataError, RequestTimeoutError, ServeError, UserError, run_cli
from sorted_jax.data.chat import chat_prompt_ids, has_chat_template, validate_messages
from sorted_jax.data.tokenizers import bos_prefix
from sorted_jax.decoding import MODES, DecodeOptions, Decoder, stop_ids
from sorted_jax.io import artifacts
from sorted_jax.model.modeling import DTYPES
from sorted_jax.serving.scheduler import Finished, Scheduler, ServeSettings, TextDelta

__all__ = ["build_app", "build_parser", "main", "parse_request"]

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
DEFAULT_MAX_TOKENS = 16


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
    p.add_argument("--warmup", default="",
                   help="comma-separated MODE[:LAYER] (e.g. fixed,fixed:4,early-exit,"
                        "speculative:4; LAYER = exit_layer / draft_layer) whose greedy programs "
                        "to compile for every batch bucket before serving (other settings "
                        "compile on first use)")
    p.add_argument("--fast-compile", action="store_true",
                   help="XLA's cheap optimisation level (tiny models, tests)")
    return p


# ---------------------------------------------------------------------------------------------
# Requests


def _field(body: dict, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ServeError(f"'{name}' must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ServeError(f"'{name}' must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "a list", dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _prompt_ids(body: dict, chat: bool, tokenizer: Any) -> list[int]:
    if chat:
        msgs = _field(body, "messages", list)
        if not msgs:
            raise ServeError("'messages' must be a non-empty list of {role, content}")
        try:  # the same checks as chat training data: roles, string contents
            clean = validate_messages({"messages": msgs}, "'messages'", for_training=False)
        except DataError as e:
            raise ServeError(str(e)) from None
        if has_chat_template(tokenizer):
            return chat_prompt_ids(tokenizer, clean)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in clean) + "assistant:"
        return bos_prefix(tokenizer) + tokenizer.encode(text)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ServeError("'prompt' is empty")
        return bos_prefix(tokenizer) + tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise ServeError("'prompt' must be a string or a list of token ids (one prompt: n and "
                     "batched prompts are not supported)")


def parse_request(body: Any, chat: bool, tokenizer: Any, config: Any,
                  default_exits: Sequence[int] | None = None
                  ) -> tuple[list[int], DecodeOptions, list[str], bool]:
    """(prompt ids, decode options, stop strings, stream) of an OpenAI request body; a
    `ServeError` (400) names the bad field. `default_exits`: early exit's exits when the
    request names none (the checkpoint's trained exits)."""
    if not isinstance(body, dict):
        raise ServeError("the request body must be a JSON object")
    if _field(body, "n", int, 1) != 1:
        raise ServeError("'n' must be 1 (one choice per request)")
    ids = _prompt_ids(body, chat, tokenizer)
    if any(not 0 <= t < config.vocab_size for t in ids):
        raise ServeError(f"prompt token ids must be in [0, {config.vocab_size})")
    ctx = config.max_position_embeddings
    if len(ids) >= ctx:
        raise ServeError(f"the prompt has {len(ids)} tokens; the model's context is {ctx}")
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _field(body, key, int, min(DEFAULT_MAX_TOKENS, ctx - len(ids)))
    if max_tokens < 1:
        raise ServeError(f"'{key}' must be >= 1, got {max_tokens}")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ServeError("'stop' must be a string or a list of at most 4 strings")
    temperature = float(_field(body, "temperature", (int, float), 1.0))
    if not 0 <= temperature <= 2:
        raise ServeError(f"'temperature' must be in [0, 2], got {temperature}")
    mode = _field(body, "mode", str)
    if mode is None:
        mode = ("speculative" if body.get("draft_layer") is not None else "early-exit"
                if body.get("thresholds") is not None or body.get("exits") is not None
                else "fixed")
    if mode not in MODES:
        raise ServeError(f"'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    thresholds = _field(body, "thresholds", list)
    if thresholds is not None and not all(
            isinstance(t, int | float) and not isinstance(t, bool) for t in thresholds):
        raise ServeError(f"'thresholds' must be a list of numbers, got {thresholds!r}")
    if thresholds is not None and not all(0 <= t <= 1 for t in thresholds):
        raise ServeError(f"'thresholds' must lie in [0, 1], got {thresholds!r}")
    exits = _field(body, "exits", list)
    if mode == "early-exit" and exits is None and default_exits is not None:
        exits = list(default_exits)
    try:
        opts = DecodeOptions(
            mode=mode, exit_layer=_field(body, "exit_layer", int), exits=exits,
            thresholds=thresholds, draft_layer=_field(body, "draft_layer", int),
            max_new_tokens=max_tokens, temperature=temperature,
            top_p=float(_field(body, "top_p", (int, float), 1.0)),
            seed=_field(body, "seed", int, 0))
        opts.route(config)
    except ServeError:
        raise
    except UserError as e:
        raise ServeError(str(e)) from None
    if len(ids) + max_tokens > ctx:
        raise ServeError(f"prompt of {len(ids)} tokens + {key}={max_tokens} exceeds the "
                         f"model's context of {ctx}")
    return ids, opts, stop, bool(_field(body, "stream", bool, False))


# ---------------------------------------------------------------------------------------------
# The app


def _error(status: int, message: str, kind: str = "invalid_request_error") -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": status}}, status_code=status)


def build_app(scheduler: Scheduler, tokenizer: Any, config: Any, model_name: str,
              default_exits: Sequence[int] | None = None) -> Any:
    """The FastAPI app over a running scheduler (closed when the app shuts down)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        yield
        scheduler.close()

    app = FastAPI(title="sorted_jax", lifespan=lifespan)
    created = int(time.time())

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "sorted_jax"}]}

    async def handle(request: Request, chat: bool) -> Any:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        try:
            ids, opts, stop, stream = parse_request(body, chat, tokenizer, config,
                                                    default_exits)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            job = scheduler.submit(ids, opts, stop, notify=lambda ev: loop.call_soon_threadsafe(
                events.put_nowait, ev))
        except ServeError as e:
            return _error(e.status, str(e), "rate_limit_error" if e.status == 429
                          else "invalid_request_error")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", True))

        async def next_event() -> Any:
            wait = max(job.deadline - time.monotonic(), 0.0) + 5.0
            try:
                return await asyncio.wait_for(events.get(), wait)
            except asyncio.TimeoutError:
                job.cancelled.set()
                return RequestTimeoutError("the request timed out")

        if not stream:
            text_parts = []
            try:
                while True:
                    ev = await next_event()
                    if isinstance(ev, TextDelta):
                        text_parts.append(ev.text)
                        continue
                    break
            finally:
                job.cancelled.set()
            if not isinstance(ev, Finished):
                status = getattr(ev, "status", 500)
                return _error(status, str(ev), "server_error" if status >= 500
                              else "invalid_request_error")
            return _response(rid, model_name, chat, ev)

        async def sse() -> AsyncIterator[str]:
            try:
                if chat:
                    yield _sse(_chunk(rid, model_name, chat, {"role": "assistant",
                                                               "content": ""}, None))
                while True:
                    ev = await next_event()
                    if isinstance(ev, TextDelta):
                        delta = {"content": ev.text} if chat else ev.text
                        yield _sse(_chunk(rid, model_name, chat, delta, None))
                        continue
                    if isinstance(ev, Finished):
                        last = _chunk(rid, model_name, chat, {} if chat else "",
                                      ev.finish_reason)
                        if include_usage:
                            last["usage"] = _usage(ev)
                        last["sorted_jax"] = ev.decoding
                        yield _sse(last)
                    else:
                        yield _sse({"error": {"message": str(ev), "type": "server_error",
                                              "code": getattr(ev, "status", 500)}})
                    break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    return app


def _usage(ev: Finished) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def _response(rid: str, model: str, chat: bool, ev: Finished) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": ev.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": ev.text}
    else:
        choice.update(text=ev.text, logprobs=None)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": _usage(ev), "sorted_jax": ev.decoding}


def _chunk(rid: str, model: str, chat: bool, delta: Any, finish: str | None) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = delta
    else:
        choice.update(text=delta, logprobs=None)
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# ---------------------------------------------------------------------------------------------
# The command


def run(args: argparse.Namespace) -> None:
    try:
        import uvicorn
    except ImportError:
        raise UserError("serving needs FastAPI and uvicorn: pip install -e '.[serve]'") from None
    art = artifacts.inspect(args.ckpt)
    tokenizer = art.tokenizer(args.tokenizer)
    dtype = DTYPES[args.dtype]
    params = art.load_params(dtype=dtype)
    if args.max_batch < 1 or args.max_queue < 0 or args.timeout_s <= 0:
        raise UserError("--max-batch must be >= 1, --max-queue >= 0 and --timeout-s > 0")
    settings = ServeSettings(max_batch=args.max_batch, max_queue=args.max_queue,
                             timeout_s=args.timeout_s)
    dec = Decoder(params, art.config, dtype=dtype, max_draft=args.max_draft,
                  pad_multiple=settings.pad_multiple,
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
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=int(args.graceful_s))
    print(f"sorted_jax.serve: {name} on http://{args.host}:{args.port}/v1", file=sys.stderr,
          flush=True)
    _graceful_server(config).run()
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
                             exits=tuple(exits) if mode == "early-exit" else None,
                             exit_layer=k if mode == "fixed" else None,
                             draft_layer=k if mode == "speculative" else None)
        try:
            opts.route(config)
        except UserError as e:
            raise e.prefixed(f"--warmup {item!r}: ") from None
        out.append(opts)
    return out


def _graceful_server(config: Any) -> Any:
    """uvicorn's server, but SIGTERM / SIGINT end it with status 0: uvicorn re-raises the
    signal after its graceful shutdown, which would make a clean stop look like a kill."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            sigs = (signal.SIGINT, signal.SIGTERM)
            old = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return GracefulServer(config)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("sorted_jax.serve", run, args)


if __name__ == "__main__":
    sys.exit(main())
