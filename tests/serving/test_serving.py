"""The serving scheduler alone, with a fake decoder (no model, no compilation): grouping by
options, bucketed batch sizes, per-request max tokens and stop strings, a full queue, timeouts
and shutdown, deterministically (the fake batch waits on an event the test sets). And the
request bodies the HTTP app reads (`serving.requests`), checked field by field."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from sorted_jax.core.errors import (
    QueueFullError,
    RequestTimeoutError,
    ServeError,
    ShuttingDownError,
)
from sorted_jax.data.tokenizers import ByteTokenizer
from sorted_jax.decoding import DecodeOptions
from sorted_jax.decoding.results import FixedStats
from sorted_jax.serving.requests import parse_request
from sorted_jax.serving.scheduler import Finished, Scheduler, ServeSettings, TextDelta


class ByteTok:
    eos_id = 2

    def decode(self, ids):
        return "".join(chr(96 + i) for i in ids if i != 2)


class FakeRun:
    """Row i emits tokens 3, 4, 5, ... one per round; `gate` holds every round. `joinable`
    as a speculative batch is: a free row takes a new prompt."""

    def __init__(self, prompts, opts, gate, joinable):
        self.opts, self.gate, self.joinable = opts, gate, joinable
        self.n = np.zeros(len(prompts), int)
        self.done = np.zeros(len(prompts), bool)
        self.inserted: list[int] = []

    def advance(self):
        self.gate.wait(10)
        live = ~self.done
        self.n[live] += 1
        self.done |= self.n >= self.opts.max_new_tokens
        return [[2 + int(k)] if ok else [] for k, ok in zip(self.n, live, strict=True)]

    def evict(self, i):
        self.done[i] = True

    def insert(self, i, ids):
        self.n[i], self.done[i] = 0, False
        self.inserted.append(i)

    def stats(self):
        return FixedStats("fixed", int(self.n.sum()), 0.0, layers=4)


class FakeDecoder:
    def __init__(self, joinable=False):
        self.config = SimpleNamespace(max_position_embeddings=64, num_hidden_layers=4)
        self.gate = threading.Event()
        self.joinable = joinable
        self.batches: list[tuple[int, DecodeOptions]] = []
        self.runs: list[FakeRun] = []

    def start(self, prompts, opts):
        self.batches.append((len(prompts), opts))
        self.runs.append(FakeRun(prompts, opts, self.gate, self.joinable))
        return self.runs[-1]


def _drain(job, timeout=10):
    text, end = "", None
    deadline = time.monotonic() + timeout
    while end is None:
        ev = job.next_event(max(deadline - time.monotonic(), 0.01))
        if isinstance(ev, TextDelta):
            text += ev.text
        else:
            end = ev
    return text, end


def test_batches_group_by_options_and_bucket():
    dec = FakeDecoder()
    sched = Scheduler(dec, ByteTok(), ServeSettings(max_batch=4, max_queue=16), eos=[2])
    try:
        a = DecodeOptions(max_new_tokens=3)
        b = DecodeOptions(mode="fixed", exit_layer=2, max_new_tokens=5)
        jobs = [sched.submit([1, 2], a) for _ in range(3)] + [sched.submit([1], b)]
        jobs.append(sched.submit([1], a.replace(max_new_tokens=5), stop=["de"]))
        dec.gate.set()
        out = [_drain(j) for j in jobs]
        assert out[0][0] == "cde" and out[0][1].finish_reason == "length"  # its own 3 tokens
        assert out[0][1].completion_tokens == 3 and out[0][1].prompt_tokens == 2
        assert isinstance(out[3][1], Finished) and out[3][0] == "cdefg"
        assert out[4][0] == "c" and out[4][1].finish_reason == "stop"  # cut before "de"
        sizes = sorted(n for n, _ in dec.batches)
        assert sizes == [1, 4]  # `a`'s 4 jobs (stop strings and lengths do not split a batch)
        assert out[0][1].decoding == {"mode": "fixed", "layers_per_token": 4.0}
    finally:
        sched.close()


def test_full_queue_timeout_and_shutdown():
    dec = FakeDecoder()
    sched = Scheduler(dec, ByteTok(), ServeSettings(max_batch=1, max_queue=1, timeout_s=0.3),
                      eos=[2])
    opts = DecodeOptions(max_new_tokens=2)
    running = sched.submit([1], opts)
    deadline = time.monotonic() + 5
    while not dec.batches and time.monotonic() < deadline:  # the worker took it
        time.sleep(0.01)
    waiting = sched.submit([1], opts, timeout_s=0.2)
    with pytest.raises(QueueFullError, match="retry later"):
        sched.submit([1], opts)
    time.sleep(0.4)  # both deadlines pass while the fake batch is held
    dec.gate.set()
    assert isinstance(_drain(running)[1], RequestTimeoutError)
    assert isinstance(_drain(waiting)[1], RequestTimeoutError)
    dec.gate.clear()
    queued = [sched.submit([1], opts, timeout_s=30)]
    deadline = time.monotonic() + 5
    while len(dec.batches) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    queued.append(sched.submit([1], opts, timeout_s=30))
    closer = threading.Thread(target=sched.close)
    closer.start()
    time.sleep(0.1)
    dec.gate.set()  # the running batch finishes; the queued one is refused
    closer.join(10)
    assert isinstance(_drain(queued[0])[1], Finished)
    assert isinstance(_drain(queued[1])[1], ShuttingDownError)
    with pytest.raises(ShuttingDownError):
        sched.submit([1], opts)


def _speculative_batch_running(max_batch: int):
    """(decoder, scheduler, jobs): a joinable batch started for a 6-token and a 2-token request,
    its rounds held by the decoder's gate."""
    dec = FakeDecoder(joinable=True)
    sched = Scheduler(dec, ByteTok(), ServeSettings(max_batch=max_batch, max_queue=8), eos=[2])
    first = [sched.submit([1], DecodeOptions(max_new_tokens=6)),
             sched.submit([1], DecodeOptions(max_new_tokens=2))]
    deadline = time.monotonic() + 5
    while not dec.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    return dec, sched, first


def test_requests_join_a_running_speculative_batch():
    """A freed row of a (per-row) speculative batch takes the next waiting request of the
    same settings at the next round; a longer request waits for the next batch."""
    dec, sched, first = _speculative_batch_running(max_batch=2)
    short, long_ = DecodeOptions(max_new_tokens=2), DecodeOptions(max_new_tokens=6)
    try:
        later = [sched.submit([1], short), sched.submit([1], long_.replace(max_new_tokens=9))]
        dec.gate.set()
        texts = [_drain(j)[0] for j in first + later]
        assert texts == ["cdefgh", "cd", "cd", "cdefghijk"]
        assert dec.runs[0].inserted == [1]  # the short request took row 1 of the first batch
        assert len(dec.batches) == 2  # the 9-token request could not join a 6-token batch
    finally:
        sched.close()


def test_a_small_speculative_batch_drains_when_more_wait_than_fit():
    """A batch of 2 rows with 3 requests waiting for its 1 free row takes none of them: it
    drains and the next batch takes all 3 in a bucket of 4 (joining one at a time kept a burst
    in the first batch's few rows)."""
    dec, sched, first = _speculative_batch_running(max_batch=4)
    short = DecodeOptions(max_new_tokens=2)
    try:
        later = [sched.submit([1], short) for _ in range(3)]
        dec.gate.set()
        texts = [_drain(j)[0] for j in first + later]
        assert texts == ["cdefgh", "cd", "cd", "cd", "cd"]
        assert dec.batches[0][0] == 2 and dec.runs[0].inserted == []
        assert [b for b, _ in dec.batches] == [2, 4]
    finally:
        sched.close()


# ---------------------------------------------------------------------------------------------
# Request bodies (sorted_jax.serving.requests: no HTTP framework, no model)


def _parse(body, chat=False):
    config = SimpleNamespace(vocab_size=264, max_position_embeddings=64, num_hidden_layers=4)
    return parse_request(body, chat, ByteTokenizer(), config, default_exits=(2, 4))


def test_parse_request_reads_prompt_options_stop_and_stream():
    ids, opts, stop, stream = _parse({"prompt": "ab", "max_tokens": 5, "temperature": 0,
                                      "stop": "\n", "stream": True, "draft_layer": 2})
    assert ids == [1, 3 + ord("a"), 3 + ord("b")]  # BOS + bytes
    assert (opts.mode, opts.draft_layer, opts.max_new_tokens, opts.greedy) == (
        "speculative", 2, 5, True)  # the mode the fields imply
    assert stop == ["\n"] and stream is True
    ids, opts, stop, stream = _parse({"prompt": [5, 6], "thresholds": [0.5]})
    assert ids == [5, 6] and opts.mode == "early-exit" and opts.exits == (2, 4)
    assert stop == [] and stream is False and opts.max_new_tokens == 16  # the default
    assert _parse({"prompt": ["ab"]})[0] == _parse({"prompt": "ab"})[0]  # a list of one
    ids, _, _, _ = _parse({"messages": [{"role": "user", "content": "hi"}]}, chat=True)
    assert ids[0] == 1 and bytes(t - 3 for t in ids[1:]).decode() == "user: hi\nassistant:"


@pytest.mark.parametrize("body, match", [
    ([], "must be a JSON object"),
    ({"prompt": "x", "n": 2}, "'n' must be 1"),
    ({"prompt": ""}, "'prompt' is empty"),
    ({"prompt": 3}, "'prompt' must be a string or a list of token ids"),
    ({"prompt": [1, 999]}, "prompt token ids must be in [0, 264)"),
    ({"prompt": "x", "max_tokens": True}, "'max_tokens' must be an integer, got True"),
    ({"prompt": "x", "max_tokens": 0}, "'max_tokens' must be >= 1"),
    ({"prompt": "x", "max_tokens": 63}, "exceeds the model's context of 64"),
    ({"prompt": "x", "temperature": 3}, "'temperature' must be in [0, 2]"),
    ({"prompt": "x", "stop": ["a"] * 5}, "at most 4 strings"),
    ({"prompt": "x", "mode": "fast"}, "'mode' must be one of"),
    ({"prompt": "x", "thresholds": [2]}, "'thresholds' must lie in [0, 1]"),
    ({"prompt": "x", "exit_layer": 9}, "exit_layer must be an integer in 1..4"),
])
def test_parse_request_names_the_bad_field(body, match):
    with pytest.raises(ServeError) as e:
        _parse(body)
    assert match in str(e.value) and e.value.status == 400


def test_parse_request_checks_messages_like_training_data():
    with pytest.raises(ServeError, match="non-empty list"):
        _parse({"messages": []}, chat=True)
    with pytest.raises(ServeError, match="role"):
        _parse({"messages": [{"role": "bot", "content": "x"}]}, chat=True)
