"""Every table and plot the commands write: per-exit Markdown tables and matplotlib PNGs.

    exit_table        training's end-of-run table (`WORKDIR/exit_table.md`)
    plot_exit_losses  held-out loss per exit over training (`WORKDIR/exit_loss.png`)
    metrics_table     evaluate's table, one row per exit, columns checkpoint x metric
    plot_quality      evaluate's loss / accuracy (/ TriviaQA EM) vs exit, one line per checkpoint
    plot_speed        evaluate's loss vs decode latency, one point per exit

matplotlib (Agg) is imported when a plot is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sorted_jax.objective.metric_keys import exit_values

# exp() of a larger loss overflows a float; such a model is noise anyway.
MAX_LOG_PERPLEXITY = 50.0


def perplexity(loss: float) -> float:
    """exp(loss), clamped at exp(MAX_LOG_PERPLEXITY)."""
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def exit_table(eval_metrics: Mapping[str, Any] | None, train_metrics: Mapping[str, Any] | None,
               *, num_layers: int, title: str = "") -> str:
    """Markdown table, one row per exit: eval loss / perplexity / token accuracy, train loss."""
    eval_metrics = eval_metrics or {}
    train_metrics = train_metrics or {}
    ev_loss, ev_acc = exit_values(eval_metrics, "loss"), exit_values(eval_metrics, "accuracy")
    tr_loss = exit_values(train_metrics, "loss")
    exits = sorted(set(ev_loss) | set(tr_loss))
    lines = [f"{title}\n" if title else ""]
    lines.append("| exit (layers) | eval loss | eval ppl | eval token acc | train loss |")
    lines.append("|---:|---:|---:|---:|---:|")

    for e in exits:
        loss = ev_loss.get(e)
        ppl = perplexity(loss) if loss is not None else None
        tag = f"{e}/{num_layers}"
        lines.append(f"| {tag} | {_fmt(loss, '.4f')} | {_fmt(ppl, '.3f')} | "
                     f"{_fmt(ev_acc.get(e), '.4f')} | {_fmt(tr_loss.get(e), '.4f')} |")
    return "\n".join(line for line in lines if line) + "\n"


def plot_exit_losses(history: Sequence[tuple[int, Mapping[str, Any]]], path: str | Path,
                     title: str = "held-out loss per exit") -> bool:
    """PNG of eval loss vs step, one line per exit; `history` = [(step, eval metrics)].

    Returns False (and writes nothing) when there is nothing to plot.
    """
    points: dict[int, list[tuple[int, float]]] = {}
    for step, metrics in history:
        for e, v in exit_values(metrics).items():
            points.setdefault(e, []).append((int(step), v))
    if not points:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for e, pts in sorted(points.items()):
        pts.sort()
        style = "o-" if len(pts) < 30 else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"exit {e}",
                markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True



COLUMNS = (("loss", "loss", ".4f"), ("perplexity", "ppl", ".3f"), ("accuracy", "acc", ".4f"),
           ("triviaqa_em", "TQA EM", ".3f"), ("ms_per_token", "ms/tok", ".3f"))


def metrics_table(results: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """Markdown: one row per exit, columns checkpoint x metric."""
    exits = sorted({int(e) for r in results for e in r["exits"]})
    cols = [(r, key, name, spec) for r in results for key, name, spec in COLUMNS
            if any(key in v for v in r["exits"].values())]
    lines = [f"{title}\n" if title else ""]
    lines.append("| exit | " + " | ".join(f"{r['label']} {name}" for r, _, name, _ in cols)
                 + " |")
    lines.append("|---:|" + "---:|" * len(cols))
    for e in exits:
        cells = []
        for r, key, _, spec in cols:
            v = r["exits"].get(e, r["exits"].get(str(e), {})).get(key)
            cells.append(_fmt(v, spec))
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(x for x in lines if x) + "\n"


def plot_quality(results: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Loss, token accuracy (and TriviaQA EM) vs exit layer, one line per checkpoint."""
    plt = _plt()
    panels = [("loss", "cross-entropy (nats / token)"), ("accuracy", "token accuracy")]
    if any("triviaqa_em" in v for r in results for v in r["exits"].values()):
        panels.append(("triviaqa_em", "TriviaQA exact match"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), dpi=100)
    for ax, (key, ylabel) in zip(np.atleast_1d(axes), panels, strict=True):
        for r in results:
            pts = sorted((int(e), v[key]) for e, v in r["exits"].items() if key in v)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=r["label"])
        ax.set_xlabel("exit layer (sub-model depth)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("held-out quality per exit")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_speed(results: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Loss vs measured decode latency, one point per exit (labelled), one line per ckpt."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=100)
    for r in results:
        pts = [(v["ms_per_token"], v["loss"], int(e)) for e, v in sorted(
            r["exits"].items(), key=lambda kv: int(kv[0])) if "ms_per_token" in v]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=r["label"])
        for x, y, e in pts:
            ax.annotate(str(e), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("decode latency (ms / token, batch 1, greedy)")
    ax.set_ylabel("held-out cross-entropy (nats / token)")
    ax.set_title("speed vs quality (points = exit layers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
