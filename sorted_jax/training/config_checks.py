"""Every number of the training config in its range (`run_spec.check_static` runs this first):
ratios and fractions in [0, 1], counts >= 0, rates > 0. Each error is a `TrainConfigError` naming
its field, its range and what the field means (`fields`, so the command can add where the value
was set: the config file or the command line).

    check_ranges(config)    # before the workdir, the data or a device is touched
"""

from __future__ import annotations

from typing import Any

import ml_collections

from sorted_jax.core.errors import TrainConfigError

__all__ = ["RANGES", "check_ranges"]

# field -> (low, high, low inclusive, high inclusive, what the value is); None = unbounded.
RANGES: dict[str, tuple[float | None, float | None, bool, bool, str]] = {
    "batch_size": (1, None, True, False, "sequences per step"),
    "grad_accum": (1, None, True, False, "micro-batches per step"),
    "log_every": (1, None, True, False, "steps"),
    "loss_rows_per_chunk": (1, None, True, False, "rows"),
    "num_steps": (0, None, True, False, "steps; 0 = use epochs"),
    "epochs": (0, None, True, False, "passes over the data"),
    "eval_every": (0, None, True, False, "steps; 0 = only at the end"),
    "eval_batches": (0, None, True, False, "batches; 0 = the whole held-out set"),
    "eval_batch_size": (0, None, True, False, "0 = the micro-batch size"),
    "checkpoint_every": (0, None, True, False, "steps"),
    "keep_checkpoints": (0, None, True, False, "checkpoints; 0 = keep all"),
    "resume_step": (-1, None, True, False, "-1 = the newest intact checkpoint, or a step"),
    "max_len": (2, None, True, False, "tokens per sequence"),
    "distill_weight": (0, None, True, False, "a loss weight"),
    "exit_curriculum.hold": (0, 1, True, True, "a fraction of the run's steps"),
    "exit_curriculum.ramp": (0, 1, True, True, "a fraction of the run's steps"),
    "optim.lr": (0, None, False, False, "the peak learning rate"),
    "optim.warmup_ratio": (0, 1, True, True, "a fraction of the run's steps"),
    "optim.warmup_steps": (-1, None, True, False, "steps; -1 = use warmup_ratio"),
    "optim.end_lr_ratio": (0, 1, True, True, "the final learning rate as a fraction of lr"),
    "optim.weight_decay": (0, None, True, False, "a decay rate"),
    "optim.b1": (0, 1, True, False, "Adam's first-moment decay"),
    "optim.b2": (0, 1, True, False, "Adam's second-moment decay"),
    "optim.eps": (0, None, False, False, "Adam's epsilon"),
    "optim.clip_norm": (0, None, True, False, "a gradient norm; 0 = no clipping"),
    "data.eval_holdout": (0, None, True, False, "records"),
    "data.max_records": (0, None, True, False, "records; 0 = all"),
    "distributed.num_processes": (0, None, True, False, "processes; 0 = auto"),
    "distributed.process_id": (-1, None, True, False, "-1 = auto"),
    "distributed.initialization_timeout": (0, None, False, False, "seconds"),
}
# model.* besides model.preset: overrides of the preset's sizes, 0 = the preset's value.
MODEL_OVERRIDE_RANGE = (0, None, True, False, "0 = the preset's value")


def _get(c: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = c
    for part in key.split("."):
        node = node[part]
    return node


def _range_text(low: float | None, high: float | None, low_in: bool, high_in: bool) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def check_ranges(c: ml_collections.ConfigDict) -> None:
    ranges = {**RANGES, **{f"model.{k}": MODEL_OVERRIDE_RANGE for k in c.model.keys()
                           if k != "preset"}}
    for key, (low, high, low_in, high_in, what) in ranges.items():
        value = _get(c, key)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
        if ok and low is not None:
            ok = value >= low if low_in else value > low
        if ok and high is not None:
            ok = value <= high if high_in else value < high
        if not ok:
            raise TrainConfigError(f"{key} must be {_range_text(low, high, low_in, high_in)} "
                                   f"({what}), got {value!r}", fields=(key,))
