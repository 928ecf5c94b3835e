"""`python -m sorted_jax.train --config=configs/soft_7b.py --workdir=DIR`: SoFT / SFT training.

    python -m sorted_jax.train --config=configs/tiny.py --workdir=/tmp/soft_tiny
    python -m sorted_jax.train --config=configs/soft_7b.py --workdir=/ckpt/soft7b \\
        --config.init_from=/models/llama2-7b --config.optim.lr=1e-5 --config.exits=12,20,32

Fields: `sorted_jax.training.train_config.default_config` (`--help` says where). Overrides are
`--config.a.b=value`; an unknown key fails with the list of known ones, and an error about a
field says where its value was set (the config file or the command line). Re-running a command
on a workdir that has checkpoints resumes that run (params, optimizer state, step, data
position); `init_from` instead loads base weights into a fresh run (new optimizer, step 0).

Workdir:

    WORKDIR/config.json            the model config (HF style)
    WORKDIR/train_config.json      the full training config of the latest launch
    WORKDIR/tokenizer/             the tokenizer files
    WORKDIR/checkpoints/<step>/    Orbax: state {params, opt_state, step}, data, meta
    WORKDIR/metrics.jsonl          one JSON line per train log / eval (append-only)
    WORKDIR/tensorboard/           TensorBoard events (tensorboardX)
    WORKDIR/exit_table.md          per-exit held-out loss / perplexity / accuracy at the end
    WORKDIR/final_metrics.json
    WORKDIR/exit_loss.png          held-out loss per exit over training
    WORKDIR/run_status.json        how the last launch ended: finished | preempted | failed
    WORKDIR/data_stats.json        records read / dropped / truncated per split
    WORKDIR/checkpoint_manifests/  per step: its files and sizes, and its health
    WORKDIR/set_aside/             checkpoints newer than the step a run resumed from
    WORKDIR/.sorted_jax.json       the marker that makes the dir a training workdir

The workdir must be new, empty or a training workdir: never a dir something else wrote, nor
init_from or a data file. One run writes a workdir at a time: a second `train` on it (a job
submitted twice) exits 2 naming the one that holds it (`WORKDIR/.sorted_jax.lock`, an OS lock
that a killed run does not leave behind). A resume takes the newest intact checkpoint (damaged
or diverged newer steps are named and moved to `set_aside/`), or `--config.resume_step=N`.

`--plan [--plan_devices=N] [--plan_device_memory=h100|GIB]` prints the per-device memory of the
config's train step and whether it fits, without allocating the model or training.

SIGTERM / SIGINT: the step in flight finishes, a checkpoint is written and the process exits 0
(a second SIGINT aborts); `run_status.json` says "preempted". A non-finite loss or gradient norm
stops the run (exit 1) naming which one and the last good checkpoint, the newest whose weights
had a finite loss and gradient norm; the bad state is not saved. A save that fails (a full
disk) stops the run at the next step boundary (exit 2) naming the last good step.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections

from sorted_jax.core.errors import NonFiniteLossError, TrainConfigError, run_cli
from sorted_jax.parallel.distributed import init_distributed
from sorted_jax.training import memory_plan
from sorted_jax.training.run_args import parse_args, usage, wants_help, with_origins
from sorted_jax.training.trainer import Trainer

__all__ = ["main", "run"]


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Train (or resume) in `workdir`; returns the final metrics."""
    init_distributed(config.distributed)
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    return Trainer(config, workdir).train()


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 finished or preempted, 1 a non-finite loss, 2 a user error."""
    argv = list(sys.argv if argv is None else argv)
    if wants_help(argv):
        print(usage(), end="")
        return 0
    argv, plan_opts = memory_plan.pop_plan_flags(argv)

    def command() -> int:
        config, workdir = parse_args(argv)
        try:
            if plan_opts is not None:
                return memory_plan.run_plan(config, argv, plan_opts)
            run(config, workdir)
        except TrainConfigError as e:  # say where the fields it names were set
            raise with_origins(e, argv) from None
        return 0

    try:
        return run_cli("sorted_jax.train", command)
    except NonFiniteLossError as e:
        print(f"sorted_jax.train: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
