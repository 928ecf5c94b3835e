"""`python -m sorted_jax.sweep`: several SoFT recipes on the same data and budget, side by side.

    python -m sorted_jax.sweep --config=configs/tiny_finetune.py --out=runs/sweep \\
        --pretrain-config=configs/tiny_pretrain.py --seeds=0,1,2 \\
        --recipe=uniform --recipe=last --recipe=depth --recipe=sqrt --recipe=ramp \\
        --recipe=distill --recipe=depth-distill

For each seed it trains the SFT baseline (exit set {L}, every recipe's exits evaluated), SFT+ICT
on it (one head per exit, trunk frozen), and one SoFT run per recipe, all from the same config
and base weights (`--pretrain-config` first trains those base weights once, as a plain LM-style
SFT run, and every run starts from them). Then `evaluate` measures every checkpoint of a seed on
the config's held-out data, and the sweep writes, over seeds (mean and standard deviation):

    OUT/recipes.md     per-exit held-out loss, one row per recipe (and SFT, SFT+ICT), with the
                       last exit's loss relative to SFT's and the mean over intermediate exits
    OUT/recipes.json   the same numbers, per seed too
    OUT/pareto.png     last-exit loss vs mean intermediate-exit loss, one point per recipe

Every step is a command of its own (`python -m sorted_jax.train / ict / evaluate`), run as a
child process with its output in OUT/logs/; a run whose workdir already finished is reused, so
an interrupted sweep continues where it stopped. A recipe is a name with config overrides
(`NAME=key=value key=value`, keys relative to `--config.`), or one of the built-in names:
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sorted_jax.core.errors import SweepError, run_cli
from sorted_jax.evaluation import reports
from sorted_jax.io import destinations

# name -> (config overrides, what it trades)
RECIPES: dict[str, tuple[tuple[str, ...], str]] = {
    "uniform": ((), "the paper: mean of the exits' losses"),
    "last": (("exit_weights=last:0.5",), "half the weight on the last exit"),
    "depth": (("exit_weights=depth",), "weights proportional to depth"),
    "sqrt": (("exit_weights=sqrt",), "weights proportional to sqrt(depth)"),
    "ramp": (("exit_curriculum.hold=0.1", "exit_curriculum.ramp=0.4"),
             "SFT for 10% of the steps, then a linear ramp to uniform over 40%"),
    "distill": (("distill_weight=0.1",),
                "uniform + 0.1 x KL of every exit toward the last exit's distribution"),
    "depth-distill": (("exit_weights=depth", "distill_weight=0.1"),
                      "depth weights + 0.1 x KL toward the last exit"),
    "last-ramp": (("exit_weights=last:0.5", "exit_curriculum.hold=0.1",
                   "exit_curriculum.ramp=0.4"), "last:0.5 reached through the SFT ramp"),
}
__doc__ += "".join(f"\n    {k:<10} {v[1]}" for k, v in RECIPES.items()) + "\n"

SFT, ICT = "sft", "sft+ict"
TABLE_MD, TABLE_JSON, PARETO_PNG = "recipes.md", "recipes.json", "pareto.png"


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    overrides: tuple[str, ...]  # "key=value", relative to --config.

    @classmethod
    def parse(cls, text: str) -> Recipe:
        name, sep, rest = text.partition("=")
        name = name.strip()
        if not name or not all(c.isalnum() or c in "-_." for c in name) or name in (SFT, ICT):
            raise SweepError(f"recipe {text!r}: a recipe is NAME or NAME=key=value ... with a "
                             f"name of letters, digits, '-', '_' or '.' (not {SFT!r}/{ICT!r})")
        if not sep:
            if name not in RECIPES:
                raise SweepError(f"unknown recipe {name!r}: built-in ones are "
                                 f"{', '.join(RECIPES)}; or give NAME=key=value ...")
            return cls(name, RECIPES[name][0])
        overrides = tuple(shlex.split(rest))
        bad = [o for o in overrides if "=" not in o or o.startswith("-")]
        if bad or not overrides:
            raise SweepError(f"recipe {text!r}: overrides are key=value pairs (keys relative to "
                             f"--config., e.g. exit_weights=depth), got {bad or 'none'}")
        return cls(name, overrides)

    def flags(self) -> list[str]:
        return [f"--config.{o}" for o in self.overrides]


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sorted_jax.sweep",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--config", required=True, help="the fine-tuning config file")
    p.add_argument("--out", required=True, help="sweep dir (runs/, eval/, logs/, tables)")
    p.add_argument("--recipe", action="append", default=[], help="repeat; see below")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--pretrain-config", default="",
                   help="train base weights with this config first; every run starts there")
    p.add_argument("--no-ict", action="store_true", help="skip the SFT+ICT baseline")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every training run, pretraining included (relative to "
                        "--config.), e.g. num_steps=50")
    p.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the pretraining run only, e.g. model.hidden_size=64")
    p.add_argument("--ict-steps", type=int, default=0, help="> 0: ICT steps (default 1 epoch)")
    p.add_argument("--eval-limit", type=int, default=0,
                   help="> 0: evaluate on the first N held-out records only")
    args = p.parse_args(list(argv))
    args.recipes = [Recipe.parse(r) for r in (args.recipe or ["uniform"])]
    names = [r.name for r in args.recipes]
    if len(set(names)) != len(names):
        raise SweepError(f"recipe names repeat: {names}")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SweepError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not args.seed_list:
        raise SweepError("--seeds is empty")
    for path in (args.config, args.pretrain_config):
        if path and not Path(path).is_file():
            raise SweepError(f"config file {path!r} does not exist")
    bad = [s for s in (*args.set, *args.pretrain_set) if "=" not in s or s.startswith("-")]
    if bad:
        raise SweepError(f"--set / --pretrain-set take key=value (relative to --config.), "
                         f"got {bad}")
    return args


class Runner:
    """Runs child commands with their output in OUT/logs/, failing with the log's tail."""

    def __init__(self, out: Path):
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, argv: list[str]) -> None:
        log = self.logs / f"{name}.log"
        print(f"+ python -m {shlex.join(argv)}  > {log}", flush=True)
        t0 = time.time()
        with open(log, "w", encoding="utf-8") as f:
            rc = subprocess.run([sys.executable, "-m", *argv], stdout=f,
                                stderr=subprocess.STDOUT).returncode
        if rc:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise SweepError(f"{name} failed (exit {rc}); its log {log} ends:\n{tail}")
        print(f"  done in {time.time() - t0:.0f} s", flush=True)


def _finished(workdir: Path) -> bool:
    return (workdir / "final_metrics.json").is_file()


def _train(run: Runner, name: str, config: str, workdir: Path, flags: list[str]) -> None:
    if _finished(workdir):
        print(f"= {name}: reusing {workdir}", flush=True)
        return
    run(name, ["sorted_jax.train", f"--config={config}", f"--workdir={workdir}", *flags])


def _settings(workdir: Path) -> dict[str, Any]:
    return json.loads((workdir / "train_config.json").read_text())


def _evaluate(run: Runner, seed_dir: Path, labels: dict[str, Path], data: str,
              out: Path, limit: int = 0) -> dict[str, dict[int, float]]:
    """{label: {exit: held-out loss}} of every checkpoint of one seed, by `evaluate`."""
    metrics = out / "exit_metrics.json"
    if not metrics.is_file():
        argv = ["sorted_jax.evaluate", "--data", data, "--out", str(out)]
        if limit:
            argv += ["--limit", str(limit)]
        for label, path in labels.items():
            argv += ["--ckpt", str(path), "--label", label]
        run(f"evaluate_{seed_dir.name}", argv)
    rows = json.loads(metrics.read_text())["checkpoints"]
    return {r["label"]: {int(e): float(v["loss"]) for e, v in r["exits"].items()} for r in rows}


def summarise(per_seed: dict[int, dict[str, dict[int, float]]]) -> dict[str, Any]:
    """Mean / sd over seeds per label and exit, the last exit vs SFT's, mean intermediate."""
    labels = list(next(iter(per_seed.values())))
    exits = sorted(next(iter(per_seed.values()))[labels[0]])
    last = exits[-1]
    out: dict[str, Any] = {"exits": exits, "seeds": sorted(per_seed), "rows": {}}
    for label in labels:
        per_exit = {e: [per_seed[s][label][e] for s in per_seed] for e in exits}
        inter = [sum(per_seed[s][label][e] for e in exits[:-1]) / max(len(exits) - 1, 1)
                 for s in per_seed]
        vs_sft = [per_seed[s][label][last] / per_seed[s][SFT][last] - 1 for s in per_seed] \
            if SFT in labels else []
        out["rows"][label] = {
            "loss": {e: _mean_sd(v) for e, v in per_exit.items()},
            "mean_intermediate": _mean_sd(inter),
            "last_vs_sft": _mean_sd(vs_sft) if vs_sft else None,
            "per_seed": {s: per_seed[s][label] for s in per_seed},
        }
    return out


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def table(summary: dict[str, Any], trades: dict[str, str]) -> str:
    exits = summary["exits"]
    n = len(summary["seeds"])
    head = ("| recipe | " + " | ".join(f"exit {e}" for e in exits) +
            " | last vs SFT | mean intermediate | what it trades |")
    lines = [f"Held-out loss (nats/token), mean +- sd over {n} seed(s) {summary['seeds']}", "",
             head, "|---|" + "---:|" * (len(exits) + 2) + "---|"]
    for label, row in summary["rows"].items():
        cells = [f"{m:.4f} +- {sd:.4f}" for m, sd in (row["loss"][e] for e in exits)]
        vs = row["last_vs_sft"]
        vs_text = "-" if vs is None else f"{100 * vs[0]:+.2f}% +- {100 * vs[1]:.2f}"
        inter = row["mean_intermediate"]
        lines.append(f"| {label} | " + " | ".join(cells) +
                     f" | {vs_text} | {inter[0]:.4f} | {trades.get(label, '')} |")
    return "\n".join(lines) + "\n"


def plot_pareto(summary: dict[str, Any], path: Path) -> None:
    plt = reports._plt()
    last = summary["exits"][-1]
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=100)
    for label, row in summary["rows"].items():
        x, xs = row["loss"][last]
        y, ys = row["mean_intermediate"]
        marker = "s" if label in (SFT, ICT) else "o"
        ax.errorbar(x, y, xerr=xs, yerr=ys, fmt=marker, capsize=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"last exit ({last}) held-out loss")
    ax.set_ylabel("mean intermediate-exit held-out loss")
    ax.set_title("recipes: lower-left is better")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _is_sweep_dir(path: Path) -> bool:
    """A sweep's OUT from before destination markers: its logs and runs, nothing else."""
    names = {p.name for p in path.iterdir()}
    return (path / "logs").is_dir() and names <= {"logs", "runs", "pretrain", "eval",
                                                  TABLE_MD, TABLE_JSON, PARETO_PNG}


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    # OUT is new, empty or this sweep's own (which continues): never someone else's dir, and
    # never one of its config files' dirs.
    dest = destinations.claim_dir(args.out, flag="--out", command="sorted_jax.sweep",
                                  inputs=[args.config, args.pretrain_config or None],
                                  resume=True, recognise=_is_sweep_dir)
    out = dest.path
    destinations.make_dirs(out)
    destinations.write_marker(out, dest.command)
    runner = Runner(out)
    common = [f"--config.{s}" for s in args.set]
    if args.pretrain_config:
        base = out / "pretrain"
        _train(runner, "pretrain", args.pretrain_config, base,
               [*common, *(f"--config.{s}" for s in args.pretrain_set)])
        common.append(f"--config.init_from={base}")
    per_seed: dict[int, dict[str, dict[int, float]]] = {}
    trades = {SFT: "baseline: exit set {L}", ICT: "baseline: SFT + one head per exit"}
    for seed in args.seed_list:
        seed_dir = out / "runs" / f"seed{seed}"
        flags = [*common, f"--config.seed={seed}"]
        labels: dict[str, Path] = {}
        for recipe in args.recipes:
            wd = seed_dir / recipe.name
            _train(runner, f"{recipe.name}_seed{seed}", args.config, wd, [*flags,
                                                                          *recipe.flags()])
            labels[recipe.name] = wd
            trades[recipe.name] = RECIPES.get(recipe.name, ((), ""))[1] or " ".join(
                recipe.overrides)
        exits = ",".join(str(e) for e in _settings(labels[args.recipes[0].name])["exits"])
        sft = seed_dir / SFT
        _train(runner, f"sft_seed{seed}", args.config, sft,
               [*flags, "--config.exits=last", f"--config.eval_exits={exits}"])
        labels = {SFT: sft, **labels}
        if not args.no_ict:
            ict_dir = seed_dir / "sft_ict"
            if not (ict_dir / "ict.json").is_file():
                argv = ["sorted_jax.ict", "--ckpt", str(sft), "--out", str(ict_dir),
                        "--exits", exits, "--seed", str(seed)]
                if args.ict_steps:
                    argv += ["--num-steps", str(args.ict_steps)]
                runner(f"ict_seed{seed}", argv)
            labels = {SFT: sft, ICT: ict_dir, **{k: v for k, v in labels.items() if k != SFT}}
        data = _settings(sft)["data"]["train"]
        per_seed[seed] = _evaluate(runner, seed_dir, labels, data, out / "eval" / f"seed{seed}",
                                   args.eval_limit)
    summary = summarise(per_seed)
    (out / TABLE_MD).write_text(table(summary, trades))
    (out / TABLE_JSON).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot_pareto(summary, out / PARETO_PNG)
    print((out / TABLE_MD).read_text())
    print(f"wrote {out / TABLE_MD}, {out / TABLE_JSON}, {out / PARETO_PNG}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    def go() -> int:
        run_sweep(_parse(sys.argv[1:] if argv is None else argv))
        return 0

    return run_cli("sorted_jax.sweep", go)


if __name__ == "__main__":
    sys.exit(main())
