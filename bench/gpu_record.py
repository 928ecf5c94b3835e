"""The JSON lines of bench/gpu_suite.sh: every figure printed once, flushed, and kept on disk.

The suite runs each benchmark as it is and pipes its output through here, so the benchmarks
need no suite-specific code:

    python bench/train_step.py ... | python bench/gpu_record.py pipe --step train_1b --out DIR
    python bench/decode.py ...     | python bench/gpu_record.py pipe --step decode --decode ...
    python bench/gpu_record.py skip|error|train-run|finish --step ... --out DIR

Each line is `{"step", "figure", ...figures, "dry_run", "elapsed_s"}`, printed to stdout and
appended to `DIR/results.jsonl` the moment it is known: a suite killed by a time limit keeps
everything measured before. Other output goes to stderr (the suite sends it to its log).
Strict JSON: NaN and infinities (the peer's peak memory on a CPU) become null.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

RESULTS = "results.jsonl"
NOT_FIGURES = ("command", "note", "peer_missing")  # lines that say what ran, not what it did
TRAIN_STEPS = ("train_1b", "train_1b_tuned")  # step 2 (with the peer) and step 3 (ours only)

# The targets, checked in the `targets` line (meaningless on the CPU dry run's tiny
# shapes: there they only show that the check runs).
TARGETS = {
    "soft_tok_per_s_over_peer": ">= 1.25 (SoFT tokens/s, ours / compiled peer, same run)",
    "soft_peak_mem_over_peer": "<= 0.6 (SoFT peak memory, ours / compiled peer)",
    "soft_over_sft_time_over_theory": "within 5% of 1 (time ratio / FLOP ratio)",
    "decode_cost_minus_bound": "<= 0 at every k (cost of depth k vs full) - (k/L + 0.1)",
}


def strict(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


class Recorder:
    def __init__(self, args: argparse.Namespace):
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.step, self.dry_run, self.t0 = args.step, args.dry_run, args.t0

    def emit(self, figure: str, **fields: Any) -> None:
        row = {"step": self.step, "figure": figure, **fields, "dry_run": self.dry_run}
        if self.t0:
            row["elapsed_s"] = round(time.time() - self.t0, 1)
        line = json.dumps(strict(row))
        with open(self.out / RESULTS, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        print(line, flush=True)

    def rows(self) -> list[dict]:
        path = self.out / RESULTS
        if not path.is_file():
            return []
        return [json.loads(s) for s in path.read_text().splitlines() if s.strip()]


# -- parsing the benchmarks' output -----------------------------------------------------------

def json_rows(lines: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """(figure, fields) for every JSON line of gpu_env.py / train_step.py; the rest to stderr.

    train_step.py prints `{"mode", "impl", ...}` per measurement (ours and the peer's) and
    `{"summary": {...}}` once; the peer's own ratio line has neither.
    """
    for line in lines:
        text = line.strip()
        try:
            row = json.loads(text) if text.startswith("{") else None
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            print(line, end="", file=sys.stderr)
            continue
        if "summary" in row:
            yield "summary", row["summary"]
        elif "mode" in row:
            yield f"{row.get('impl', 'sorted_jax')}/{row['mode']}", row
        else:
            yield str(row.pop("figure", "other")), row


_NUM = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")


def _numbers(tokens: list[str]) -> list[float] | None:
    return [float(t) for t in tokens] if tokens and all(_NUM.match(t) for t in tokens) else None


def decode_rows(lines: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """(figure, fields) from bench/decode.py's text tables; unparsed lines to stderr."""
    section = None
    for line in lines:
        text = line.strip()
        words = text.split()
        if text.startswith("model:"):
            yield "decode_model", {"model": text[len("model:"):].strip()}
            continue
        m = re.match(r"full model: ([\d.]+) ms/token \(([\d.]+) tokens/s\)", text)
        if m:
            yield "decode_full", {"ms_per_token": float(m[1]), "tokens_per_s": float(m[2])}
            continue
        if text.startswith("fixed exit"):
            section = "fixed"
        elif text.startswith("self-speculative"):
            section = "speculative"
        elif text.startswith("early exit over exits"):
            section = "early_exit"
        elif section == "fixed" and (v := _numbers(words)) and len(v) == 4:
            yield "decode_fixed", {"k": int(v[0]), "ms_per_token": v[1], "cost_vs_full": v[2],
                                   "k_over_L": v[3]}
            continue
        elif section == "speculative" and (v := _numbers(words)) and len(v) == 6:
            yield "decode_speculative", {"draft_layer": int(v[0]), "ms_per_token": v[1],
                                         "speedup": v[2], "acceptance": v[3],
                                         "full_passes": int(v[4]), "tokens_per_full_pass": v[5]}
            continue
        elif section == "early_exit" and len(words) > 3 and (v := _numbers(words[-3:])):
            yield "decode_early_exit", {"thresholds": " ".join(words[:-3]),
                                        "ms_per_token": v[0], "speedup": v[1],
                                        "avg_exit_layer": v[2]}
            continue
        print(line, end="", file=sys.stderr)


# -- commands ---------------------------------------------------------------------------------

def cmd_pipe(rec: Recorder, args: argparse.Namespace) -> None:
    matmul = next((r["matmul_tflops"] for r in rec.rows() if r.get("figure") == "matmul"
                   and r.get("matmul_tflops")), None)
    parse = decode_rows if args.decode else json_rows
    for figure, row in parse(sys.stdin):
        if matmul and row.get("model_tflops") and "mfu_vs_matmul" not in row:
            row["mfu_vs_matmul"] = round(row["model_tflops"] / matmul, 3)  # same machine
        rec.emit(figure, **row)


def cmd_error(rec: Recorder, args: argparse.Namespace) -> None:
    if args.rc in (124, 137):
        what = f"timed out after {args.timeout} s (exit {args.rc})"
    else:
        what = f"exit {args.rc}"
    tail = []
    if args.log and Path(args.log).is_file():
        tail = Path(args.log).read_text(errors="replace").splitlines()[-args.tail:]
    rec.emit("error", error=what, log_tail=tail)


def cmd_train_run(rec: Recorder, args: argparse.Namespace) -> None:
    """Step 5: the trainer's wall time, with what its workdir says it did."""
    lines = Path(args.workdir, "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(s) for s in lines if s.strip()]
    train = [m for m in metrics if m.get("split") == "train"]
    evals = [m for m in metrics if m.get("split") == "eval"]
    last = evals[-1] if evals else {}
    rec.emit("train_wall", wall_s=round(args.wall_s, 2), steps=train[-1]["step"] if train else 0,
             train_tokens_per_s=train[-1].get("tokens_per_s") if train else None,
             eval_loss={k.split("_")[-1]: v for k, v in last.items()
                        if k.startswith("loss/exit_")},
             eval_time_s=last.get("eval_time_s"), extra_args=args.extra)


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b and math.isfinite(b):
        return round(a / b, 3)
    return None


def targets(rows: list[dict]) -> dict:
    """The issue's targets from this run's lines (None where a figure is missing)."""
    out: dict[str, Any] = {}
    peer = {r["mode"]: r for r in rows if r.get("step") == "train_1b"
            and str(r.get("impl", "")).startswith("torch")}
    if not peer:  # train_step.py drops a peer that failed or ran out of memory: say so here
        out["peer"] = "no peer figures in this run (see suite.log)"
    for step in TRAIN_STEPS:
        ours = {r["mode"]: r for r in rows if r.get("step") == step
                and r.get("impl") == "sorted_jax"}
        summary = next((r for r in rows if r.get("step") == step
                        and r.get("figure") == "summary"), {})
        soft = next((m for m in ours if m != "sft"), None)
        if not ours or soft is None:
            continue
        t: dict[str, Any] = {"soft_mode": soft}
        t["soft_tok_per_s_over_peer"] = _ratio(ours[soft].get("tok_per_s"),
                                               peer.get(soft, {}).get("tok_per_s"))
        t["sft_tok_per_s_over_peer"] = _ratio(ours.get("sft", {}).get("tok_per_s"),
                                              peer.get("sft", {}).get("tok_per_s"))
        t["soft_peak_mem_over_peer"] = _ratio(ours[soft].get("peak_mem_GiB"),
                                              peer.get(soft, {}).get("peak_mem_GiB"))
        t["soft_over_sft_time_over_theory"] = _ratio(summary.get("soft_over_sft_time"),
                                                     summary.get("soft_over_sft_flops_theory"))
        x, y, z = (t["soft_tok_per_s_over_peer"], t["soft_peak_mem_over_peer"],
                   t["soft_over_sft_time_over_theory"])
        t["met"] = {"tok_per_s": None if x is None else x >= 1.25,
                    "peak_mem": None if y is None else y <= 0.6,
                    "soft_over_sft": None if z is None else abs(z - 1) <= 0.05}
        out[step] = t
    fixed = [r for r in rows if r.get("figure") == "decode_fixed"]
    if fixed:
        margin = {r["k"]: round(r["cost_vs_full"] - (r["k_over_L"] + 0.1), 3) for r in fixed}
        out["decode"] = {"decode_cost_minus_bound": margin,
                         "met": all(v <= 0 for v in margin.values())}
    return out


def cmd_finish(rec: Recorder, args: argparse.Namespace) -> None:
    rows = rec.rows()
    rec.emit("targets", **targets(rows), definitions=TARGETS)
    # ok: figures only; partial: figures, then an error (e.g. the peer timed out); failed: an
    # error and no figure; skipped: left out for the time budget.
    figures: dict[str, set] = {}
    for r in rows:
        if r.get("step") not in (None, "suite") and r.get("figure") not in NOT_FIGURES:
            figures.setdefault(r["step"], set()).add(r.get("figure"))
    status = {}
    for step, figs in figures.items():
        measured = figs - {"error", "skipped"}
        status[step] = ("skipped" if "skipped" in figs else
                        ("partial" if measured else "failed") if "error" in figs else "ok")
    rec.emit("done", wall_s=round(args.wall_s, 1), budget_s=args.budget,
             **{k: [s for s, v in status.items() if v == k]
                for k in ("ok", "partial", "failed", "skipped")})


def main(argv=None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help=f"results dir ({RESULTS} is appended to)")
    common.add_argument("--step", required=True)
    common.add_argument("--dry-run", action="store_true")
    common.add_argument("--t0", type=float, default=0.0, help="suite start (epoch seconds)")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pipe", parents=[common], help="tag a benchmark's stdout")
    p.add_argument("--decode", action="store_true", help="parse bench/decode.py's tables")
    p = sub.add_parser("skip", parents=[common], help="a step left out")
    p.add_argument("--reason", required=True)
    p = sub.add_parser("error", parents=[common], help="a step that failed")
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--timeout", type=float, default=0)
    p.add_argument("--log", default=None)
    p.add_argument("--tail", type=int, default=15)
    p = sub.add_parser("train-run", parents=[common], help="step 5's wall time")
    p.add_argument("--workdir", required=True)
    p.add_argument("--wall-s", type=float, required=True)
    p.add_argument("--extra", default="", help="overrides the suite added (recorded as is)")
    p = sub.add_parser("note", parents=[common], help="one line of key=value fields")
    p.add_argument("fields", nargs="*")
    p = sub.add_parser("finish", parents=[common], help="the targets and the suite's status")
    p.add_argument("--wall-s", type=float, required=True)
    p.add_argument("--budget", type=float, required=True)
    args = ap.parse_args(argv)

    rec = Recorder(args)
    if args.cmd == "pipe":
        cmd_pipe(rec, args)
    elif args.cmd == "skip":
        rec.emit("skipped", skipped=args.reason)
    elif args.cmd == "error":
        cmd_error(rec, args)
    elif args.cmd == "train-run":
        cmd_train_run(rec, args)
    elif args.cmd == "note":
        fields = dict(f.split("=", 1) for f in args.fields)
        fields = {k: int(v) if v.isdigit() else v for k, v in fields.items()}
        rec.emit(fields.pop("figure", "note"), **fields)
    elif args.cmd == "finish":
        cmd_finish(rec, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
