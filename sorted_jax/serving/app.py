"""The OpenAI-compatible HTTP app over a running `Scheduler`: `GET /v1/models`,
`POST /v1/completions` and `POST /v1/chat/completions`, as one JSON response or SSE chunks
(`stream: true`), each carrying `sorted_jax` (how it decoded); and the uvicorn server that
ends with status 0 after a graceful SIGTERM / Ctrl-C.

Requests are read by `sorted_jax.serving.requests`; batching, the bounded queue (429) and
per-request timeouts (504) are the scheduler's. FastAPI and uvicorn are imported only when an
app is built or served (the `serve` extra).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request).

import asyncio
import contextlib
import errno
import json
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sorted_jax.core.errors import RequestTimeoutError, ServeError, UsageError, UserError
from sorted_jax.serving.requests import parse_request
from sorted_jax.serving.scheduler import Finished, Scheduler, TextDelta

__all__ = ["build_app", "require_server_packages", "serve_app"]


def require_server_packages() -> None:
    """A `UserError` (before any model is loaded) when FastAPI or uvicorn is not installed."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("serving needs FastAPI and uvicorn: pip install -e '.[serve]'") from None


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


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) for `serve_app`, or a `UsageError` naming the flags
    when the address is taken (another server) or cannot be bound: said before the model is
    loaded and before any URL is printed."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UsageError(f"--host {host}: cannot be resolved ({e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = ("the address is in use (another server?); choose another --port or stop it"
               if e.errno == errno.EADDRINUSE else f"{e.strerror}")
        raise UsageError(f"--host {host} --port {port}: cannot listen there: {why}") from None
    return sock


def serve_app(app: Any, sock: socket.socket, graceful_s: float) -> None:
    """Serve `app` on `sock` (`listen_socket`) until SIGTERM / SIGINT; in-flight requests get
    `graceful_s` to finish."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=int(graceful_s))
    _graceful_server(config).run(sockets=[sock])


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
