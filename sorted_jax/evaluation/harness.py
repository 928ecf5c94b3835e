"""lm-evaluation-harness tasks at each exit of one checkpoint: `evaluate lm-eval`.

    run_lm_eval(LmEvalOptions(ckpt="runs/soft", exits="8,16,24,32", tasks="hellaswag,arc_easy",
                              out="lm_eval_out"))

The harness (`lm_eval`, the `lm-eval` extra) runs once per column with the model of
`lm_eval_model` (`ExitLM` behind `harness_model`), on the checkpoint's weights loaded once:

* mode ``fixed`` (the default): one column per exit k of `exits` (layers 1..k + head);
* mode ``speculative``: one column per draft depth k of `exits`; scores are the full model's
  and greedy generations too (a check of the decoder), with the acceptance rate per k;
* mode ``early-exit``: one column, early exit over `exits` with `thresholds`.

Tasks are the harness's names (tasks, groups, tags, globs) or YAML files; `include_path` adds
a dir of task YAMLs (e.g. local `dataset_path: json` tasks: no hub access). When every name is
found there, the harness's own ~15k built-in task files are not indexed at all (it makes no
difference to the tasks: an included task overrides a built-in one of the same name).

Outputs in `out` (checked before anything is read: new or empty, or `overwrite`):

    lm_eval_table.md      one row per (task, metric, filter), one column per exit: value ± stderr
    lm_eval_summary.json  the same numbers, decoding statistics per column, the settings
    <column>/results.json the harness's own results JSON of that column (as `lm_eval
                          --output_path` writes it, without samples)
    <column>/samples_<task>.jsonl   with `log_samples`: every request and response
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sorted_jax.core.errors import DecodeError, EvalError
from sorted_jax.decoding import MODES, DecodeOptions
from sorted_jax.evaluation import evaluator, lm_eval_model
from sorted_jax.io import destinations
from sorted_jax.model.modeling import DTYPES
from sorted_jax.objective import heads

COMMAND = "sorted_jax.evaluate lm-eval"
TABLE_MD, SUMMARY_JSON, RESULTS_JSON = "lm_eval_table.md", "lm_eval_summary.json", "results.json"


@dataclasses.dataclass(frozen=True)
class LmEvalOptions:
    """A field per flag of `python -m sorted_jax.evaluate lm-eval` (same name and default)."""

    ckpt: str
    tasks: str
    exits: str | None = None  # default: the checkpoint's exits
    mode: str = "fixed"
    thresholds: Sequence[float] | None = None
    limit: float | None = None
    num_fewshot: int | None = None
    include_path: str | None = None
    batch_size: int = 8
    max_gen_toks: int = 256
    dtype: str = "float32"
    tokenizer: str | None = None
    seed: int = 0
    bootstrap_iters: int = 100000
    log_samples: bool = False
    out: str = "lm_eval_out"
    overwrite: bool = False


def column_name(mode: str, exit_layer: int | None, exits: Sequence[int]) -> str:
    if mode == "fixed":
        return f"exit_{exit_layer}"
    if mode == "speculative":
        return f"spec_draft_{exit_layer}"
    return "early_exit_" + "-".join(map(str, exits))


# ---------------------------------------------------------------------------------------------
# tasks


def task_manager(tasks: Sequence[str], include_path: str | None) -> Any:
    """The harness's `TaskManager` that knows every name of `tasks` (or an `EvalError` naming
    the unknown ones); only the included dir's tasks when they cover every name."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise EvalError(f"--include-path {include_path!r} is not a directory of task YAMLs")
    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if not _unknown(local, tasks):
            return local
    tm = TaskManager(include_path=include_path)
    unknown = _unknown(tm, tasks)
    if unknown:
        near = sorted({m for u in unknown
                       for m in difflib.get_close_matches(u, tm.all_tasks, n=3, cutoff=0.75)})
        where = "lm-eval's tasks" + (f" or --include-path {include_path}" if include_path
                                     else " (add your own with --include-path DIR)")
        raise EvalError(f"--tasks: unknown task {', '.join(map(repr, unknown))}: not a task, "
                        f"group or tag of {where}, nor a YAML file"
                        + (f"; close matches: {', '.join(near)}" if near else ""))
    return tm


def _unknown(tm: Any, tasks: Sequence[str]) -> list[str]:
    return [t for t in tasks if not tm.match_tasks([t]) and not Path(t).is_file()]


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise EvalError("--tasks is empty: give task names, e.g. --tasks hellaswag,arc_easy")
    return tasks


# ---------------------------------------------------------------------------------------------
# tables


def metric_rows(results: dict[str, Any]) -> list[tuple[str, str, str, float, Any]]:
    """(task, metric, filter, value, stderr or None) of a harness result's `results`."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric == "alias" or metric.endswith("_stderr") or not filt:
                continue
            err = metrics.get(f"{metric}_stderr,{filt}")
            rows.append((task, metric, filt, value, err))
    return rows


def _cell(value: Any, err: Any) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    if isinstance(err, (int, float)):
        return f"{value:.4f} ± {err:.4f}"
    return f"{value:.4f}"


def results_table(columns: dict[str, dict[str, Any]], title: str) -> str:
    """Markdown: a row per (task, metric, filter), a column per exit, value ± stderr."""
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    for name, res in columns.items():
        for task, metric, filt, value, err in metric_rows(res):
            cells.setdefault((task, metric, filt), {})[name] = _cell(value, err)
    names = list(columns)
    lines = [title, "", "| task | metric | filter | " + " | ".join(names) + " |",
             "|---|---|---|" + "---:|" * len(names)]
    for (task, metric, filt), row in cells.items():
        lines.append(f"| {task} | {metric} | {filt} | "
                     + " | ".join(row.get(n, "") for n in names) + " |")
    return "\n".join(lines) + "\n"


def _write_column(out_dir: Path, name: str, res: dict[str, Any], log_samples: bool) -> None:
    from lm_eval.utils import handle_non_serializable

    d = out_dir / name
    d.mkdir()
    body = {k: v for k, v in res.items() if k != "samples"}
    (d / RESULTS_JSON).write_text(json.dumps(body, indent=2, default=handle_non_serializable,
                                             ensure_ascii=False) + "\n")
    if log_samples:
        for task, samples in res.get("samples", {}).items():
            with (d / f"samples_{task}.jsonl").open("w") as f:
                for s in samples:
                    f.write(json.dumps(s, default=handle_non_serializable,
                                       ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# the run


def _check(opts: LmEvalOptions) -> list[str]:
    if opts.mode not in MODES:
        raise EvalError(f"--mode must be one of {', '.join(MODES)}, got {opts.mode!r}")
    for flag in ("batch_size", "max_gen_toks"):
        if getattr(opts, flag) < 1:
            raise EvalError(f"--{flag.replace('_', '-')} must be >= 1")
    if opts.thresholds is not None and opts.mode != "early-exit":
        raise EvalError("--thresholds is for --mode early-exit")
    if opts.limit is not None and opts.limit <= 0:
        raise EvalError("--limit must be > 0 (a count, or a fraction below 1)")
    lm_eval_model.require_lm_eval()
    return parse_tasks(opts.tasks)


def _decode_options(opts: LmEvalOptions, exit_layer: int | None, ladder: Sequence[int]
                    ) -> DecodeOptions:
    """What one column decodes with: exit k, the early-exit ladder, or drafts of depth k."""
    return DecodeOptions(mode=opts.mode, seed=opts.seed,
                         exit_layer=exit_layer if opts.mode == "fixed" else None,
                         draft_layer=exit_layer if opts.mode == "speculative" else None,
                         exits=tuple(ladder) if opts.mode == "early-exit" else None,
                         thresholds=opts.thresholds)


def _limit(limit: float | None) -> float | int | None:
    """The harness's `limit`: a count (an int) from 1 up, a fraction of each task below 1."""
    return int(limit) if limit is not None and limit >= 1 else limit


def _is_own_dir(path: Path) -> bool:
    return (path / SUMMARY_JSON).is_file()


def run_lm_eval(opts: LmEvalOptions) -> dict[str, Any]:
    """Check everything, run the harness per column, write the reports; the summary."""
    tasks = _check(opts)
    import lm_eval
    out = destinations.claim_dir(opts.out, flag="--out", command=COMMAND,
                                 inputs=[opts.ckpt, opts.include_path, opts.tokenizer],
                                 overwrite=opts.overwrite, recognise=_is_own_dir)
    ckpt = evaluator.load_checkpoint(opts.ckpt, Path(opts.ckpt).absolute().name,
                                     opts.tokenizer, load_weights=False)
    exits = evaluator.resolve_exits_for(ckpt, opts.exits)
    if ckpt.is_ict and opts.mode != "fixed":
        raise EvalError(f"{ckpt.path} is an SFT+ICT dir (a head per exit): only --mode fixed")
    kind = [(None, exits)] if opts.mode == "early-exit" else [(e, (e,)) for e in exits]
    for exit_layer, ladder in kind:  # each column's layers, before any task or weight is read
        try:
            _decode_options(opts, exit_layer, ladder).route(ckpt.config)
        except DecodeError as e:
            raise e.prefixed(f"--mode {opts.mode} --exits {','.join(map(str, exits))}: "
                             ) from None
    tm = task_manager(tasks, opts.include_path)
    ckpt.load()
    dtype = DTYPES[opts.dtype]
    columns: dict[str, dict[str, Any]] = {}
    stats: dict[str, dict[str, Any]] = {}
    for exit_layer, ladder in kind:
        name = column_name(opts.mode, exit_layer, ladder)
        params, config = ckpt.params, ckpt.config
        if opts.mode == "fixed":
            params, config = heads.exit_model(ckpt.params, ckpt.config, ckpt.heads, exit_layer)
        lm = lm_eval_model.ExitLM(
            params, config, ckpt.tokenizer, _decode_options(opts, exit_layer, ladder),
            dtype=dtype, batch_size=opts.batch_size, max_gen_toks=opts.max_gen_toks,
            name=f"{ckpt.path}:{name}")
        t0 = time.time()
        res = lm_eval.simple_evaluate(
            model=lm_eval_model.harness_model(lm), tasks=tasks, num_fewshot=opts.num_fewshot,
            limit=_limit(opts.limit), batch_size=opts.batch_size, task_manager=tm,
            bootstrap_iters=opts.bootstrap_iters, log_samples=opts.log_samples,
            random_seed=opts.seed)
        columns[name] = dict(res)
        stats[name] = {"seconds": round(time.time() - t0, 2),
                       **lm_eval_model.stats_dict(lm.stats)}
        print(f"{name}: " + ", ".join(f"{t} {m} {v:.4f}" for t, m, _, v, _ in
                                      metric_rows(columns[name])
                                      if isinstance(v, (int, float))), flush=True)
    title = (f"lm-eval on {ckpt.path} ({ckpt.config.num_hidden_layers} layers), mode "
             f"{opts.mode}; tasks {', '.join(tasks)}; num_fewshot {opts.num_fewshot}, limit "
             f"{opts.limit}; value ± the harness's stderr")
    table = results_table(columns, title)
    summary = {"checkpoint": str(ckpt.path), "num_layers": ckpt.config.num_hidden_layers,
               "mode": opts.mode, "exits": list(exits), "tasks": tasks,
               "options": {k: v for k, v in dataclasses.asdict(opts).items()},
               "columns": {n: {"results": r["results"], "decoding": stats[n]}
                           for n, r in columns.items()}}
    with destinations.atomic_dir(out) as tmp:
        (tmp / TABLE_MD).write_text(table)
        (tmp / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        for n, r in columns.items():
            _write_column(tmp, n, r, opts.log_samples)
    print("\n" + table + f"\nwrote {out.path / TABLE_MD}, {out.path / SUMMARY_JSON} and "
          f"{len(columns)} x {RESULTS_JSON}", flush=True)
    return summary
