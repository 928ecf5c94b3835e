"""What a run shows of its exits on disk: the held-out loss curve per exit, re-plotted at every
eval, and the per-exit table at the end.

Kept apart from the Trainer because it is file output only: the plot needs every eval point of
the workdir, earlier launches' included (read once from `metrics.jsonl`), which the loop itself
never looks at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sorted_jax.io import reports
from sorted_jax.training import metrics_log


class ExitReport:
    """The workdir's exit plot and table (process 0 only)."""

    def __init__(self, workdir: Path, num_layers: int, exits: Sequence[int]):
        self.workdir, self.num_layers, self.exits = workdir, num_layers, tuple(exits)
        self._points: dict[int, Mapping[str, Any]] | None = None  # step -> eval metrics

    def _history(self) -> dict[int, Mapping[str, Any]]:
        """Eval points by step: earlier launches' read from metrics.jsonl once (a later line
        wins a step), this launch's added as they come."""
        if self._points is None:
            rows = metrics_log.read_metrics(self.workdir, "eval")
            self._points = {r["step"]: r for r in rows}
        return self._points

    def _plot(self) -> None:
        reports.plot_exit_losses(sorted(self._history().items()),
                                 self.workdir / metrics_log.EXIT_PLOT_FILE)

    def add_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._history()[step] = metrics
        self._plot()

    def write_final(self, step: int, final_eval: Mapping[str, Any] | None,
                    last_train: Mapping[str, Any]) -> str:
        """The per-exit table (written and returned); the plot too unless an eval at this step
        has just drawn it."""
        table = reports.exit_table(
            final_eval, last_train, num_layers=self.num_layers,
            title=f"Per-exit metrics at step {step} (exits {','.join(map(str, self.exits))}; "
                  "eval = held-out split)")
        (self.workdir / metrics_log.EXIT_TABLE_FILE).write_text(table)
        if final_eval is None:
            self._plot()
        return table
