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
import sys
from collections.abc import Sequence

from sorted_jax.core.errors import run_cli
from sorted_jax.evaluation.sweep import RECIPES, SweepOptions, run_sweep

__doc__ += "".join(f"\n    {k:<10} {v[1]}" for k, v in RECIPES.items()) + "\n"


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every training run, pretraining included (relative to "
                        "--config.), e.g. num_steps=50")
    p.add_argument("--pretrain-set", dest="pretrain_overrides", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="override for the pretraining run only, e.g. model.hidden_size=64")
    p.add_argument("--ict-steps", type=int, default=0, help="> 0: ICT steps (default 1 epoch)")
    p.add_argument("--eval-limit", type=int, default=0,
                   help="> 0: evaluate on the first N held-out records only")
    return p


def run(args: argparse.Namespace) -> None:
    run_sweep(SweepOptions.from_flags(**vars(args)))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_cli("sorted_jax.sweep", run, args)


if __name__ == "__main__":
    sys.exit(main())
