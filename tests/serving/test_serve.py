"""The OpenAI-compatible server, end to end: a real `python -m sorted_jax.serve` process on
127.0.0.1 (a free port), talked to with the real `openai` client.

Two servers per module (tiny random model, cheap XLA compile): one for requests, one with a
1-slot queue and batch 1 for 429 and SIGTERM. Every wait is bounded; nothing leaves the
loopback.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import helpers
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

START_TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt: Path, log: Path, *args: str):
        self.port = _free_port()
        env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sorted_jax.serve", "--ckpt", str(ckpt), "--port",
             str(self.port), "--fast-compile", *args],
            env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # noqa: SIM115
        self.url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/models", timeout=2).read()
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError("server did not start")

    def client(self, timeout: float = 60.0):
        return openai.OpenAI(base_url=self.url, api_key="none", timeout=timeout, max_retries=0)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return helpers.tiny_model_dir(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    srv.stop()


GREEDY = dict(temperature=0, max_tokens=8)


def test_models_and_completions(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["model"]
    res = client.completions.create(model="model", prompt="The cat", **GREEDY)
    assert res.usage.prompt_tokens == len("The cat") + 1  # bytes + BOS
    assert 1 <= res.usage.completion_tokens <= 8
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
    assert res.choices[0].finish_reason in ("stop", "length")
    extra = res.model_extra["sorted_jax"]
    assert extra["mode"] == "fixed" and extra["layers_per_token"] == 4.0
    chunks = list(client.completions.create(model="model", prompt="The cat", stream=True,
                                            **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == res.choices[0].text
    assert chunks[-1].choices[0].finish_reason == res.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == res.usage.completion_tokens
    spec = client.completions.create(model="model", prompt="The cat", **GREEDY,
                                     extra_body={"mode": "speculative", "draft_layer": 2})
    assert spec.choices[0].text == res.choices[0].text  # greedy speculative = full model
    info = spec.model_extra["sorted_jax"]
    assert info["draft_layer"] == 2 and 0 <= info["batch_acceptance_rate"] <= 1
    assert "verify_rounds" in info and info["layers_per_token"] > 0


def test_chat_completions(server):
    client = server.client()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    res = client.chat.completions.create(model="model", messages=msgs, **GREEDY,
                                         extra_body={"exit_layer": 2})
    assert res.choices[0].message.role == "assistant"
    assert res.model_extra["sorted_jax"]["layers_per_token"] == 2.0
    chunks = list(client.chat.completions.create(model="model", messages=msgs, stream=True,
                                                 **GREEDY, extra_body={"exit_layer": 2}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == res.choices[0].message.content
    # a stop string cuts the text before it
    if len(text) > 2:
        cut = client.chat.completions.create(model="model", messages=msgs, stop=[text[2:4]],
                                             **GREEDY, extra_body={"exit_layer": 2})
        assert cut.choices[0].message.content == text[:text.index(text[2:4])]
        assert cut.choices[0].finish_reason == "stop"


MIXED = [
    {},
    {"exit_layer": 2},
    {"mode": "early-exit", "exits": [1, 2, 4], "thresholds": [0.05, 0.05]},
    {"mode": "speculative", "draft_layer": 1},
]


def test_concurrent_mixed_modes_equal_alone(server):
    """16 clients at once, four modes: every greedy output equals the same request alone."""
    client = server.client(timeout=120)
    reqs = [("Once upon a time" + " x" * (i % 5), MIXED[i % 4]) for i in range(16)]

    def ask(req):
        prompt, extra = req
        r = client.completions.create(model="model", prompt=prompt, temperature=0,
                                      max_tokens=6 + i_of(req) % 3, extra_body=extra)
        return r.choices[0].text, r.usage.completion_tokens

    def i_of(req):
        return reqs.index(req)

    alone = [ask(r) for r in reqs]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, reqs, timeout=300))
    assert together == alone


@pytest.mark.parametrize("body,match", [
    ({"exit_layer": 0}, "exit_layer must be an integer in 1..4"),
    ({"exit_layer": 5}, "exit_layer must be an integer in 1..4"),
    ({"mode": "beam"}, "'mode' must be one of"),
    ({"mode": "early-exit", "exits": [1, 2, 4], "thresholds": [0.9]}, "need 2 thresholds"),
    ({"mode": "early-exit", "thresholds": [1.5, 0.2, 0.1]}, "thresholds' must lie in"),
    ({"mode": "early-exit", "thresholds": "high"}, "'thresholds' must be a list"),
    ({"draft_layer": 4}, "draft_layer must be an integer in 1..3"),
    ({"n": 2}, "'n' must be 1"),
    ({"prompt": "x" * 200}, "context is 128"),
    ({"max_tokens": 125}, "exceeds the model's context of 128"),
])
def test_bad_requests_get_400(server, body, match):
    client = server.client()
    body = dict(body)
    prompt = body.pop("prompt", "Hello")
    max_tokens = body.pop("max_tokens", 4)
    with pytest.raises(openai.BadRequestError, match=match):
        client.completions.create(model="model", prompt=prompt, max_tokens=max_tokens,
                                  extra_body=body)


def test_full_queue_429_and_sigterm(model_dir, tmp_path):
    log = tmp_path / "small.log"
    srv = Server(model_dir, log, "--max-queue", "1", "--max-batch", "1")
    try:
        client = srv.client(timeout=120)

        def ask(_):
            try:
                client.completions.create(model="model", prompt="Hi", max_tokens=40,
                                          temperature=0)
                return "ok"
            except openai.RateLimitError:
                return "429"

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            got = list(pool.map(ask, range(12), timeout=300))
        assert "429" in got and "ok" in got, got
        # SIGTERM while a request streams: it finishes, then the server exits cleanly
        stream = client.completions.create(model="model", prompt="Hi", max_tokens=40,
                                           temperature=0, stream=True)
        it = iter(stream)
        first = next(it)
        srv.proc.send_signal(signal.SIGTERM)
        rest = list(it)
        assert (rest or [first])[-1].choices[0].finish_reason in ("stop", "length")
        assert srv.proc.wait(60) == 0
        assert "stopped" in log.read_text()
    finally:
        srv.stop()
