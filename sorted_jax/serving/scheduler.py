"""The serving scheduler: requests in, batched decoding rounds out, one worker thread.

    sched = Scheduler(decoder, tokenizer, ServeSettings(max_batch=16))
    job = sched.submit(ids, DecodeOptions(mode="speculative", max_new_tokens=64), stop=("\\n",))
    for event in job.events(): ...        # TextDelta ... then Finished (or an error)

Requests that can share a compiled program and its traced knobs (same `DecodeOptions` but
for `max_new_tokens`; sampled requests also the same seed) share a batch. A batch is padded
to the next size in `buckets` (padding rows repeat a real prompt, their output is dropped)
and every prompt to a multiple of `pad_multiple` tokens, with one KV cache length for the
whole server, so a new request never compiles anything new once its (mode, bucket, prompt
bucket) has run. The worker takes the oldest waiting request's group, decodes it round by
round (`Decoder.start`), sends each row's new text as it is made, and stops a row at its own
`max_new_tokens`, stop string, EOS, timeout or cancellation. In a speculative batch (per-row
cache lengths) a freed row takes the next waiting request of the same settings, which joins
at the next round; in fixed / early-exit batches (one shared cache index) requests arriving
meanwhile join the next batch. The queue of waiting requests is bounded (`QueueFullError`
when full).

Greedy requests give the same tokens whatever batch they land in (rows are independent,
per-row speculative commit and dynamic speculation included: verification is exact), except
early exit with the decoder's `ee_min_saving` > 0 (`serve --ee-min-saving`, default 0), whose
check schedule is the batch's. A sampled request's draws depend on its batch (one
seed per batch), as in any batched server.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sorted_jax.core.errors import (
    QueueFullError,
    RequestTimeoutError,
    ServeError,
    ShuttingDownError,
)
from sorted_jax.decoding import DecodeOptions, Decoder, DecodeStats
from sorted_jax.decoding.results import EarlyExitStats, FixedStats, SpeculativeStats

__all__ = ["Finished", "Job", "Scheduler", "ServeSettings", "TextDelta"]


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """max_batch: rows per batch (the largest bucket); max_queue: waiting requests before
    429; timeout_s: per request, queueing included; max_len: KV cache slots (None = the
    model's context plus one prompt bucket)."""

    max_batch: int = 16
    max_queue: int = 64
    timeout_s: float = 120.0
    pad_multiple: int = 64
    max_len: int | None = None

    @property
    def buckets(self) -> tuple[int, ...]:
        out, b = [], 1
        while b < self.max_batch:
            out.append(b)
            b *= 2
        return (*out, self.max_batch)


@dataclasses.dataclass(frozen=True)
class TextDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    """The end of a job: its full text, token counts, why it stopped and how it decoded."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    decoding: dict[str, Any]


class Job:
    """One request: its events arrive on a thread-safe queue (`events` blocks; the HTTP layer
    reads them from a thread)."""

    def __init__(self, ids: list[int], options: DecodeOptions, stop: Sequence[str],
                 deadline: float, eos: Sequence[int], notify: Callable[[Any], None] | None):
        self.ids, self.options, self.stop = ids, options, tuple(s for s in stop if s)
        self._notify = notify
        self.deadline = deadline
        self.eos = set(eos)
        self.cancelled = threading.Event()
        self._q: queue.Queue = queue.Queue()
        self.tokens: list[int] = []
        self.sent = ""
        self.finished = False
        self.reason = ""

    @property
    def key(self) -> DecodeOptions:
        """What the batch shares: the options but for the length (and the seed, greedy)."""
        o = self.options.replace(max_new_tokens=1)
        return o.replace(seed=0) if o.greedy else o

    def put(self, item: Any) -> None:
        """Deliver an event: to `notify` (e.g. an asyncio queue's thread-safe put) if given,
        else to the blocking queue `next_event` reads."""
        if self._notify is not None:
            self._notify(item)
        else:
            self._q.put(item)

    def next_event(self, timeout: float | None = None) -> Any:
        """The next `TextDelta` / `Finished` / `ServeError` (raises `queue.Empty` on
        timeout)."""
        return self._q.get(timeout=timeout)

    def events(self) -> Iterator[Any]:
        while True:
            ev = self.next_event(max(self.deadline - time.monotonic(), 0) + 5.0)
            yield ev
            if not isinstance(ev, TextDelta):
                return


class Scheduler:
    """Batches jobs and runs them on one worker thread (module docstring)."""

    def __init__(self, decoder: Decoder, tokenizer: Any, settings: ServeSettings,
                 eos: Sequence[int]):
        self.decoder, self.tokenizer, self.settings = decoder, tokenizer, settings
        self.eos = tuple(eos)
        ctx = decoder.config.max_position_embeddings
        pad = settings.pad_multiple
        self.max_len = settings.max_len or -(-(ctx + pad) // pad) * pad
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._cancel_running = False
        self.batches_run = 0
        self._thread = threading.Thread(target=self._work, name="sorted_jax-scheduler",
                                        daemon=True)
        self._thread.start()

    # -- the HTTP side -----------------------------------------------------------------------
    def submit(self, ids: list[int], options: DecodeOptions, stop: Sequence[str] = (),
               timeout_s: float | None = None,
               notify: Callable[[Any], None] | None = None) -> Job:
        """Queue a request (its options already checked); raises `QueueFullError` /
        `ShuttingDownError`."""
        ctx = self.decoder.config.max_position_embeddings
        if len(ids) + options.max_new_tokens > ctx:
            raise ServeError(f"prompt of {len(ids)} tokens + max_tokens="
                             f"{options.max_new_tokens} exceeds the model's context of {ctx}")
        timeout = self.settings.timeout_s if timeout_s is None else timeout_s
        job = Job(ids, options.replace(eos_id=self.eos, max_len=self.max_len), stop,
                  time.monotonic() + timeout, self.eos, notify)
        with self._cv:
            if self._closing:
                raise ShuttingDownError("the server is shutting down")
            if len(self._pending) >= self.settings.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are waiting (the queue "
                                     f"holds {self.settings.max_queue}); retry later")
            self._pending.append(job)
            self._cv.notify()
        return job

    def close(self, cancel_running: bool = False, wait_s: float = 60.0) -> None:
        """Stop taking work; queued jobs get `ShuttingDownError`, the running batch finishes
        (or, with `cancel_running`, stops at its next round)."""
        with self._cv:
            self._closing = True
            self._cancel_running = cancel_running
            for job in self._pending:
                job.put(ShuttingDownError("the server shut down before this request ran"))
            self._pending.clear()
            self._cv.notify_all()
        self._thread.join(wait_s)

    def warmup(self, options: Sequence[DecodeOptions], prompt_len: int = 1) -> int:
        """Compile every batch bucket of each options' programs now (greedy and sampled
        programs differ: warm the ones you serve), so first requests do not wait on XLA.
        Run before serving; returns the number of programs warmed."""
        n = 0
        for opts in options:
            o = opts.replace(eos_id=self.eos, max_len=self.max_len, max_new_tokens=2)
            for b in self.settings.buckets:
                run = self.decoder.start([[0] * prompt_len] * b, o)
                run.advance()
                if run.joinable:  # the program that lets a request join mid-batch
                    run.evict(0)
                    run.insert(0, [0] * prompt_len)
                while not run.done.all():
                    run.advance()
                n += 1
        return n

    @property
    def queued(self) -> int:
        return len(self._pending)

    # -- the worker --------------------------------------------------------------------------
    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._pending and not self._closing:
                self._cv.wait()
            if self._closing:
                return None
            key = self._pending[0].key
            batch = [j for j in self._pending if j.key == key][: self.settings.max_batch]
            for j in batch:
                self._pending.remove(j)
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            now = time.monotonic()
            live = []
            for job in batch:
                if job.cancelled.is_set():
                    continue
                if now > job.deadline:
                    job.put(RequestTimeoutError("the request timed out in the queue"))
                else:
                    live.append(job)
            if live:
                try:
                    self._run(live)
                except Exception as e:  # noqa: BLE001 - a failed batch fails its requests
                    for job in live:
                        if not job.finished:
                            job.finished = True
                            job.put(e if isinstance(e, ServeError)
                                    else ServeError(f"decoding failed: {e}"))

    def _run(self, jobs: list[Job]) -> None:
        """Decode one batch round by round. In a speculative batch a row whose request ended
        takes the next waiting request of the same settings (and no longer length), which
        joins at the next round; other modes share one cache index, so requests arriving
        meanwhile wait for the next batch."""
        bucket = next(b for b in self.settings.buckets if b >= len(jobs))
        prompts = [j.ids for j in jobs] + [jobs[0].ids] * (bucket - len(jobs))
        max_new = max(j.options.max_new_tokens for j in jobs)
        run = self.decoder.start(prompts, jobs[0].options.replace(max_new_tokens=max_new))
        self.batches_run += 1
        rows: list[Job | None] = [*jobs, *[None] * (bucket - len(jobs))]
        key = jobs[0].key
        while True:
            new = run.advance()
            for i, job in enumerate(rows):
                if job is not None and not job.finished:
                    self._feed(job, new[i], bool(run.done[i]))
            if any(job is not None and job.finished for job in rows):
                stats = run.stats()
                for i, job in enumerate(rows):
                    if job is not None and job.finished:
                        if job.reason in ("stop", "length"):
                            self._finish(job, job.reason, stats, i)
                        rows[i] = None
            for i, job in enumerate(rows):
                if job is None and not run.done[i]:
                    run.evict(i)  # padding, or a request that ended on the host side
            if run.joinable and not self._cancel_running and self._join_fits(
                    key, max_new, sum(job is None for job in rows), bucket):
                for i in range(bucket):
                    if rows[i] is None and (job := self._take_joiner(key, max_new)) is not None:
                        run.insert(i, job.ids)
                        rows[i] = job
            if all(job is None for job in rows) or self._cancel_running:
                break
        if any(job is not None for job in rows):  # stopped by a cancelling shutdown
            stats = run.stats()
            for i, job in enumerate(rows):
                if job is not None:
                    self._finish(job, "length", stats, i)

    def _join_fits(self, key: DecodeOptions, max_new: int, free: int, bucket: int) -> bool:
        """Whether a running batch should take waiting requests into its free rows: yes while
        they all fit, or it is already the largest bucket. Else it drains and the next batch
        takes them all in a bucket their number fills (a batch started for the first one or
        two requests of a burst kept serving the rest one or two at a time: 0.44x the full
        model's requests/s at concurrency 16 in `bench/serve.py`)."""
        if bucket >= self.settings.max_batch:
            return True
        with self._cv:
            waiting = sum(j.key == key and j.options.max_new_tokens <= max_new
                          for j in self._pending)
        return waiting <= free

    def _take_joiner(self, key: DecodeOptions, max_new: int) -> Job | None:
        """The oldest live waiting job that fits a running batch (same settings, no more
        tokens than the batch was started for), or None."""
        with self._cv:
            for job in list(self._pending):
                if job.key != key or job.options.max_new_tokens > max_new:
                    continue
                self._pending.remove(job)
                if job.cancelled.is_set():
                    continue
                if time.monotonic() > job.deadline:
                    job.put(RequestTimeoutError("the request timed out in the queue"))
                    continue
                return job
        return None

    def _feed(self, job: Job, new: list[int], row_done: bool) -> None:
        """Append a row's new ids to its job; send the new text; end it when it stops."""
        if job.cancelled.is_set():
            job.finished, job.reason = True, "cancelled"
            return
        room = job.options.max_new_tokens - len(job.tokens)
        job.tokens += new[:room]
        hit_eos = bool(job.tokens) and job.tokens[-1] in job.eos
        text = self.tokenizer.decode(job.tokens[:-1] if hit_eos else job.tokens)
        reason = None
        for s in job.stop:
            at = text.find(s)
            if at >= 0:
                text, reason = text[:at], "stop"
        if reason is None and hit_eos:
            reason = "stop"
        if reason is None and (len(job.tokens) >= job.options.max_new_tokens or row_done):
            reason = "length"
        if reason is None and time.monotonic() > job.deadline:
            job.finished = True
            job.reason = "timeout"
            job.put(RequestTimeoutError("the request timed out while decoding"))
            return
        # hold back a tail that could still grow into a stop string (or a split character)
        hold = 0 if reason else max([len(s) - 1 for s in job.stop] + [0])
        safe = text[: len(text) - hold] if hold else text
        if safe.endswith("\ufffd") and reason is None:
            safe = safe.rstrip("\ufffd")
        if len(safe) > len(job.sent) and safe.startswith(job.sent):
            job.put(TextDelta(safe[len(job.sent):]))
            job.sent = safe
        if reason is not None:
            if text != job.sent and text.startswith(job.sent):
                job.put(TextDelta(text[len(job.sent):]))
            job.sent = text
            job.finished, job.reason = True, reason

    def _finish(self, job: Job, reason: str, stats: DecodeStats, row: int) -> None:
        job.finished, job.reason = True, reason
        job.put(Finished(job.sent, len(job.ids), len(job.tokens), reason,
                         decoding_report(stats, row, len(job.tokens),
                                         self.decoder.config.num_hidden_layers)))


def decoding_report(stats: DecodeStats, row: int, tokens: int, num_layers: int
                    ) -> dict[str, Any]:
    """What a response says about how its tokens were made: layers per token and, for
    speculative decoding, the acceptance (batch-level figures are marked `batch_`)."""
    out: dict[str, Any] = {"mode": stats.mode}
    if isinstance(stats, FixedStats):
        out["layers_per_token"] = float(stats.layers)
    elif isinstance(stats, EarlyExitStats):
        out["layers_per_token"] = stats.avg_exit_layer  # over the batch's tokens
        out["exit_histogram"] = {str(k): v for k, v in stats.exit_histogram.items()}
        out["thresholds"] = list(stats.thresholds)
    elif isinstance(stats, SpeculativeStats):
        k = stats.draft_layer
        rows = max(len(stats.committed_per_row), 1)
        per_row_tokens = stats.tokens / rows
        out["draft_layer"] = k
        out["layers_per_token"] = (stats.draft_passes * k + stats.full_passes * (
            num_layers - k)) / max(per_row_tokens, 1)
        out["batch_acceptance_rate"] = stats.acceptance_rate
        if row < len(stats.committed_per_row):
            out["committed_drafts"] = stats.committed_per_row[row]
            out["verify_rounds"] = stats.rounds_per_row[row]
            out["tokens_per_verify"] = tokens / max(stats.rounds_per_row[row] + 1, 1)
    return out
