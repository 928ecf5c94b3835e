"""Training logs: `metrics.jsonl`, TensorBoard events, the progress bar, per-exit metric keys.

Everything here is host-side and cheap; the trainer creates it on process 0 only. The table and
plot written from these logs are `reports`'.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sorted_jax.objective.metric_keys import exit_values

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EXIT_TABLE_FILE = "exit_table.md"
FINAL_METRICS_FILE = "final_metrics.json"
EXIT_PLOT_FILE = "exit_loss.png"

RESUMED = "resumed"  # the split of the line a resumed launch writes first


def _plain(value: Any) -> Any:
    """JSON-safe float/int (NaN and inf become strings JSON can carry)."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    value = float(value)
    return value if math.isfinite(value) else str(value)


class MetricsLogger:
    """Appends `{"step", "split", ...metrics}` lines to `metrics.jsonl` and TensorBoard scalars.

    TensorBoard goes through tensorboardX (no TensorFlow); tags are `split/metric`, e.g.
    `eval/loss/exit_12`.

    A launch that resumes from step N (`resumed_from`) first appends `{"step": N, "split":
    "resumed"}`: the rows of earlier launches past step N were superseded (the steps after the
    checkpoint are trained again) and `read_metrics` drops them; TensorBoard hides them with
    its own `purge_step`.
    """

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True,
                 resumed_from: int | None = None):
        self.workdir = Path(workdir)
        self._file = open(self.workdir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resumed_from is None else resumed_from + 1
            self._tb = SummaryWriter(logdir=str(self.workdir / TENSORBOARD_DIR),
                                     purge_step=purge)
        if resumed_from is not None:
            self.write(resumed_from, RESUMED, {})

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        line = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        line.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._tb is not None and split != RESUMED:
            for key, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{split}/{key}", value, int(step))

    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The lines of `WORKDIR/metrics.jsonl` (optionally one split), in file order, without the
    rows a later resume superseded (those past its step, written before it) or a last line
    cut short by a kill."""
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # blank, or the torn last line of a killed run
        if row.get("split") == RESUMED:
            rows = [r for r in rows if r.get("step", 0) <= row["step"]]
            continue
        rows.append(row)
    return [r for r in rows if split is None or r.get("split") == split]


def compact_exits(metrics: Mapping[str, Any]) -> str:
    """`e2 3.12 e4 2.80 ...`: per-exit losses for the progress bar."""
    return " ".join(f"e{e} {v:.3f}" for e, v in exit_values(metrics).items())


class Progress:
    """A tqdm bar (step, compact per-exit loss, tokens/s; tqdm adds the ETA), or nothing."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled:
            # Redrawn every second on a terminal; in a log file, a line every 30 s.
            tty = sys.stderr.isatty()
            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                             dynamic_ncols=True, mininterval=1.0 if tty else 30.0,
                             smoothing=0.1, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def show(self, metrics: Mapping[str, Any], tokens_per_s: float | None) -> None:
        if self._bar is None:
            return
        text = f"loss {float(metrics.get('loss', float('nan'))):.3f} | {compact_exits(metrics)}"
        if tokens_per_s:
            text += (f" | {tokens_per_s / 1000:.1f}k tok/s" if tokens_per_s >= 1000
                     else f" | {tokens_per_s:.0f} tok/s")
        self._bar.set_postfix_str(text, refresh=False)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
