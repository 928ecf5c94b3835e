"""The recipe sweep: several SoFT recipes on the same data and budget, beside SFT and SFT+ICT.

`run_sweep(SweepOptions(...))` is `python -m sorted_jax.sweep` without the command line. Every
step is a command of its own (`python -m sorted_jax.train / ict / evaluate`) run as a child
process, so a sweep holds no model in memory, its steps' logs are the commands' own, and a run
whose workdir already finished is reused (an interrupted sweep continues where it stopped).
The tables are over seeds: mean and standard deviation per recipe and exit.
"""

from __future__ import annotations

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

from sorted_jax.core.errors import SweepError
from sorted_jax.io import destinations, reports

# In a recipe's overrides, the seed's SFT run (recipes that use it run after it).
SFT_RUN = "{sft}"

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
    "anchor": (("anchor_weight=1.0",),
               "uniform + 1.0 x KL(base model || last exit): the last exit held to the base"),
    "anchor-sft": ((f"anchor_teacher={SFT_RUN}", "anchor_weight=1.0"),
                   "uniform + 1.0 x KL(the SFT model || last exit): the last exit held to SFT"),
    "adapters": ((f"init_from={SFT_RUN}", "exit_adapters=layer", "distill_weight=1.0"),
                 "the SFT run frozen + one decoder layer per exit (CE + KL to the SFT model) at "
                 "the config's lr (SmolLM2 wanted 10-30x the SFT rate: docs/training.md)"),
}

SFT, ICT = "sft", "sft+ict"
TABLE_MD, TABLE_JSON, PARETO_PNG = "recipes.md", "recipes.json", "pareto.png"
# What `python -m sorted_jax.evaluate` writes into its --out (read back per seed).
EVAL_METRICS_JSON = "exit_metrics.json"


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    overrides: tuple[str, ...]  # "key=value", relative to --config.

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """A built-in NAME, or NAME=key=value ... (shell-quoted, keys relative to --config.)."""
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

    def flags(self, sft: Path | None = None) -> list[str]:
        return [f"--config.{o.replace(SFT_RUN, str(sft))}" for o in self.overrides]

    @property
    def after_sft(self) -> bool:
        """Starts from the seed's SFT run (an override names `{sft}`)."""
        return any(SFT_RUN in o for o in self.overrides)

    @property
    def trades(self) -> str:
        """The table's 'what it trades': a built-in's description, else the overrides."""
        return RECIPES.get(self.name, ((), ""))[1] or " ".join(self.overrides)


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """One sweep as asked; checked when made, before any run starts or OUT is touched."""

    config: str  # the fine-tuning config file
    out: str  # sweep dir (runs/, eval/, logs/, tables)
    recipes: tuple[Recipe, ...] = (Recipe("uniform", RECIPES["uniform"][0]),)
    seeds: tuple[int, ...] = (0,)
    pretrain_config: str = ""  # train base weights with it first; every run starts there
    ict: bool = True  # the SFT+ICT baseline
    overrides: tuple[str, ...] = ()  # key=value for every training run, pretraining included
    pretrain_overrides: tuple[str, ...] = ()  # key=value for the pretraining run only
    ict_steps: int = 0  # > 0: ICT steps (default 1 epoch)
    eval_limit: int = 0  # > 0: evaluate on the first N held-out records only

    def __post_init__(self) -> None:
        names = [r.name for r in self.recipes]
        if len(set(names)) != len(names):
            raise SweepError(f"recipe names repeat: {names}")
        if all(r.after_sft for r in self.recipes):
            raise SweepError(f"every recipe ({names}) starts from the SFT run: add one that "
                             "trains from the base (e.g. uniform) for the exit set")
        if not self.seeds:
            raise SweepError("--seeds is empty")
        for path in (self.config, self.pretrain_config):
            if path and not Path(path).is_file():
                raise SweepError(f"config file {path!r} does not exist")
        bad = [s for s in (*self.overrides, *self.pretrain_overrides)
               if "=" not in s or s.startswith("-")]
        if bad:
            raise SweepError(f"--set / --pretrain-set take key=value (relative to --config.), "
                             f"got {bad}")

    @classmethod
    def from_flags(cls, *, recipe: Sequence[str], seeds: str, no_ict: bool,
                   overrides: Sequence[str], pretrain_overrides: Sequence[str],
                   **rest: Any) -> SweepOptions:
        """From the command's flags: recipes as text (none = uniform), seeds as '0,1,2'."""
        recipes = tuple(Recipe.parse(r) for r in (recipe or ["uniform"]))
        try:
            seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
        except ValueError:
            raise SweepError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
        return cls(recipes=recipes, seeds=seed_list, ict=not no_ict, overrides=tuple(overrides),
                   pretrain_overrides=tuple(pretrain_overrides), **rest)


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


def _exits_text(exits: Any) -> str:
    """A run's recorded exits as '2,4,6' (the config holds a string; older runs a list)."""
    if isinstance(exits, str):
        return ",".join(p for p in exits.replace(" ", "").split(",") if p)
    return ",".join(str(e) for e in exits)


def _settings(workdir: Path) -> dict[str, Any]:
    return json.loads((workdir / "train_config.json").read_text())


def _evaluate(run: Runner, seed_dir: Path, labels: dict[str, Path], data: str,
              out: Path, limit: int = 0) -> dict[str, dict[int, float]]:
    """{label: {exit: held-out loss}} of every checkpoint of one seed, by `evaluate`."""
    metrics = out / EVAL_METRICS_JSON
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
    """The Markdown table of `summarise`'s output, one row per recipe."""
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
    """Last-exit loss vs mean intermediate-exit loss, one point (+- sd) per recipe."""
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


def _run_seed(runner: Runner, opts: SweepOptions, seed: int, common: list[str], out: Path,
              trades: dict[str, str]) -> dict[str, dict[int, float]]:
    """Every run of one seed (recipes, SFT, SFT+ICT), then their evaluation."""
    seed_dir = out / "runs" / f"seed{seed}"
    flags = [*common, f"--config.seed={seed}"]
    labels: dict[str, Path] = {}
    for recipe in (r for r in opts.recipes if not r.after_sft):
        wd = seed_dir / recipe.name
        _train(runner, f"{recipe.name}_seed{seed}", opts.config, wd, [*flags, *recipe.flags()])
        labels[recipe.name] = wd
        trades[recipe.name] = recipe.trades
    first = next(r for r in opts.recipes if not r.after_sft)
    exits = _exits_text(_settings(labels[first.name])["exits"])
    sft = seed_dir / SFT
    _train(runner, f"sft_seed{seed}", opts.config, sft,
           [*flags, "--config.exits=last", f"--config.eval_exits={exits}"])
    for recipe in (r for r in opts.recipes if r.after_sft):  # on the SFT run's weights
        wd = seed_dir / recipe.name
        _train(runner, f"{recipe.name}_seed{seed}", opts.config, wd,
               [*flags, *recipe.flags(sft)])
        labels[recipe.name] = wd
        trades[recipe.name] = recipe.trades
    labels = {SFT: sft, **labels}
    if opts.ict:
        ict_dir = seed_dir / "sft_ict"
        if not (ict_dir / "ict.json").is_file():
            argv = ["sorted_jax.ict", "--ckpt", str(sft), "--out", str(ict_dir),
                    "--exits", exits, "--seed", str(seed)]
            if opts.ict_steps:
                argv += ["--num-steps", str(opts.ict_steps)]
            runner(f"ict_seed{seed}", argv)
        labels = {SFT: sft, ICT: ict_dir, **{k: v for k, v in labels.items() if k != SFT}}
    d = _settings(sft)["data"]  # the held-out source: data.eval when it is one, else train's
    data = d["eval"] if d.get("eval") and d["eval"] != "none" else d["train"]
    return _evaluate(runner, seed_dir, labels, data, out / "eval" / f"seed{seed}",
                     opts.eval_limit)


def run_sweep(opts: SweepOptions) -> dict[str, Any]:
    """Pretrain (optionally), train and evaluate every seed, write the tables and the plot."""
    # OUT is new, empty or this sweep's own (which continues): never someone else's dir, and
    # never one of its config files' dirs.
    dest = destinations.claim_dir(opts.out, flag="--out", command="sorted_jax.sweep",
                                  inputs=[opts.config, opts.pretrain_config or None],
                                  resume=True, recognise=_is_sweep_dir)
    out = dest.path
    destinations.make_dirs(out)
    destinations.write_marker(out, dest.command)
    runner = Runner(out)
    common = [f"--config.{s}" for s in opts.overrides]
    if opts.pretrain_config:
        base = out / "pretrain"
        _train(runner, "pretrain", opts.pretrain_config, base,
               [*common, *(f"--config.{s}" for s in opts.pretrain_overrides)])
        common.append(f"--config.init_from={base}")
    trades = {SFT: "baseline: exit set {L}", ICT: "baseline: SFT + one head per exit"}
    per_seed = {seed: _run_seed(runner, opts, seed, common, out, trades) for seed in opts.seeds}
    summary = summarise(per_seed)
    (out / TABLE_MD).write_text(table(summary, trades))
    (out / TABLE_JSON).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot_pareto(summary, out / PARETO_PNG)
    print((out / TABLE_MD).read_text())
    print(f"wrote {out / TABLE_MD}, {out / TABLE_JSON}, {out / PARETO_PNG}")
    return summary
