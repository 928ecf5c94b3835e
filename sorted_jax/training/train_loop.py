"""The shape of the training loop: steps come out of a generator as `StepInfo`s, and everything
else (logging, evaluation, checkpoints, the progress bar) is a hook that runs every N steps.

    hooks = Hooks()
    hooks.add(window.add, every=1)
    hooks.add(log, every=cfg.log_every, at_end=True)
    hooks.add(evaluate, every=cfg.eval_every, needs_state=True, pauses=window)
    for info in trainer.steps():      # one StepInfo per optimizer step
        hooks.run(info, last_step)

A generator that dispatches steps asynchronously fetches each step's metrics one step late
(the host never waits for the device), except where a hook that reads the train state is due
(`hooks.need_state(step, last_step)`): that step is handed over before the next is dispatched.
Hooks created with `pauses=window` have their run time excluded from the window's tokens/s.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from jax.experimental import multihost_utils


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One finished optimizer step: its number (1-based) and its metrics on the host."""

    step: int
    metrics: Mapping[str, float]
    tokens: int  # non-padding tokens of the step's batch


class Window:
    """The train metrics since the last log, averaged, with throughput over their wall time
    (minus the time paused for evaluation and checkpoints)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rows: list[Mapping[str, float]] = []
        self.tokens = 0
        self.t0 = time.time()
        self.paused = 0.0

    def add(self, info: StepInfo) -> None:
        self.rows.append(info.metrics)
        self.tokens += info.tokens

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def mean(self) -> dict[str, float] | None:
        """The window's mean metrics plus `tokens_per_s` and `steps_per_s`; None if empty."""
        if not self.rows:
            return None
        elapsed = max(time.time() - self.t0 - self.paused, 1e-9)
        out = {k: float(np.mean([r[k] for r in self.rows])) for k in self.rows[0]}
        out["tokens_per_s"] = self.tokens / elapsed
        out["steps_per_s"] = len(self.rows) / elapsed
        return out


@dataclasses.dataclass(frozen=True)
class Hook:
    fn: Callable[[StepInfo], Any]
    every: int  # run at steps divisible by this; 0 = never (unless at_end)
    at_end: bool = False  # also at the last step
    needs_state: bool = False  # reads the train state of its step (evaluation, checkpoints)
    pauses: Window | None = None  # its run time is excluded from this window's throughput

    def due(self, step: int, last_step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or (self.at_end and step == last_step)


class Hooks:
    """Hooks in the order added; `run` calls the ones due at a step."""

    def __init__(self) -> None:
        self.hooks: list[Hook] = []

    def add(self, fn: Callable[[StepInfo], Any], *, every: int, at_end: bool = False,
            needs_state: bool = False, pauses: Window | None = None) -> None:
        self.hooks.append(Hook(fn, int(every), at_end, needs_state, pauses))

    def need_state(self, step: int, last_step: int) -> bool:
        """Whether a hook due at `step` reads that step's train state: the step generator must
        hand this step over before it dispatches the next one."""
        return any(h.needs_state and h.due(step, last_step) for h in self.hooks)

    def run(self, info: StepInfo, last_step: int) -> None:
        for h in self.hooks:
            if h.due(info.step, last_step):
                t0 = time.time()
                h.fn(info)
                if h.pauses is not None:
                    h.pauses.pause(time.time() - t0)


class StopSignals:
    """SIGTERM / SIGINT request a clean stop (the loop checks `requested()` between steps); a
    second SIGINT aborts at once. With several processes, every one stops at the same step."""

    def __init__(self, process_count: int = 1):
        self.process_count = process_count
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if signum == signal.SIGINT:  # a second Ctrl-C aborts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def install(self) -> str | None:
        """Handle SIGTERM / SIGINT from now on; a warning to show when that is impossible (a
        run started off the main thread: a preemption would then save nothing)."""
        missed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # Python handles signals in the main thread only
                missed.append(signal.Signals(sig).name)
        if not missed:
            return None
        return (f"not running in the main thread, so {' and '.join(missed)} cannot be handled: "
                "a preemption will stop the run without saving a checkpoint (only the "
                "checkpoint_every saves are kept); run training in the main thread")

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def requested(self) -> bool:
        flag = self.signum is not None
        if self.process_count > 1:  # a collective: every process must call it at this step
            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name
