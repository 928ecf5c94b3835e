"""A training run's data: the train and eval records read and tokenized (`load_data`), and what
became of them (`data_stats`: records kept, dropped, truncated), which train, evaluate and ict
all report the same way (`data_stats_line`).

    data = load_data(config, tokenizer)     # RunData(train, eval, train_records, eval_records)
    for line in data.write_stats(workdir, config.max_len): print(line)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from sorted_jax.core.errors import TrainConfigError
from sorted_jax.data import (
    DataError,
    DataIterator,
    EvalIterator,
    PackedIterator,
    SourceError,
    TokenizedDataset,
    Tokenizer,
    holdout_split,
    open_records,
    spec_kind,
    tokenize_records,
)

DATA_STATS_FILE = "data_stats.json"  # records read, dropped, truncated, per split


def _read_records(spec: str, split: str, c: ml_collections.ConfigDict, what: str) -> list:
    try:
        return open_records(spec, split, data_dir=c.data.tfds_data_dir or None,
                            seed=c.data.seed)
    except SourceError as e:
        raise e.prefixed(f"{what}=") from e


@dataclasses.dataclass(frozen=True)
class RunData:
    """The tokenized splits, and how many records each was read from (before drops)."""

    train: TokenizedDataset
    eval: TokenizedDataset | None
    train_records: int
    eval_records: int

    def write_stats(self, workdir: Path, max_len: int) -> list[str]:
        """Record what became of each split's records in `WORKDIR/data_stats.json`; returns the
        lines to print, one per split that dropped or truncated records."""
        stats = {"train": data_stats(self.train, self.train_records)}
        if self.eval is not None:
            stats["eval"] = data_stats(self.eval, self.eval_records)
        (workdir / DATA_STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        lines = [(split, data_stats_line(st, f"max_len={max_len}")) for split, st in stats.items()]
        return [f"data ({split}): {line}" for split, line in lines if line]


def load_data(c: ml_collections.ConfigDict, tokenizer: Tokenizer) -> RunData:
    """The run's train and eval records, tokenized (eval: held out of the train records,
    another source, or the train source's own eval split)."""
    records = _read_records(c.data.train, c.data.train_split, c, "data.train")
    if c.data.max_records:
        records = records[:c.data.max_records]
    eval_records = None
    if c.data.eval_holdout > 0:
        try:
            records, eval_records = holdout_split(records, c.data.eval_holdout, c.data.seed)
        except DataError as e:
            raise e.prefixed("data.eval_holdout: ") from None
    elif c.data.eval == "none":
        eval_records = None
    elif c.data.eval:
        eval_records = _read_records(c.data.eval, c.data.eval_split, c, "data.eval")
    elif spec_kind(c.data.train) != "file":  # builtin and TFDS sources have an eval split
        eval_records = _read_records(c.data.train, c.data.eval_split, c, "data.eval")
    try:
        train = tokenize_records(records, tokenizer, c.max_len, c.data.template)
    except DataError as e:
        raise e.prefixed(f"data.train={c.data.train!r}: ") from None
    if len(train) == 0:
        raise TrainConfigError(f"data.train={c.data.train!r}: no record fits max_len="
                               f"{c.max_len} (every prompt is too long)")
    ev = None
    if eval_records:
        try:
            ev = tokenize_records(eval_records, tokenizer, c.max_len, c.data.template)
        except DataError as e:
            raise e.prefixed(f"data.eval={c.data.eval or c.data.train!r}: ") from None
        ev = ev if len(ev) else None
    return RunData(train, ev, len(records), len(eval_records or []))


def make_iterators(c: ml_collections.ConfigDict, data: RunData, buckets: Sequence[int] | None,
                   eval_batch_size: int, process_index: int, process_count: int,
                   note: Callable[[str], None]) -> tuple[Any, EvalIterator | None]:
    """This process's train iterator (packed rows with data.packing) and eval iterator.

    With packing every train row is max_len long, so data.buckets only shapes the (unpacked)
    evaluation batches: said once through `note` rather than refused."""
    where = dict(process_index=process_index, process_count=process_count)
    buckets = None if buckets is None else list(buckets)
    try:
        if c.data.packing:
            if buckets is not None:
                note(f"note: data.packing=True packs every training row to max_len={c.max_len}; "
                     f"data.buckets={c.data.buckets!r} is ignored for training (it still "
                     "pads the unpacked evaluation batches)")
            train = PackedIterator(data.train, c.batch_size, seed=c.seed, shuffle=c.data.shuffle,
                                   source=f"data.train={c.data.train!r}", **where)
        else:
            train = DataIterator(data.train, c.batch_size, seed=c.seed, shuffle=c.data.shuffle,
                                 buckets=buckets, **where)
        ev = None if data.eval is None else EvalIterator(data.eval, eval_batch_size,
                                                         buckets=buckets, **where)
    except DataError as e:
        raise e.prefixed("data: ") from None
    return train, ev


def data_stats(ds: TokenizedDataset, records: int) -> dict[str, Any]:
    """What became of a split's records: kept, dropped (the prompt alone is longer than
    max_len: no response token fits), truncated (the response was cut at max_len)."""
    return {"records": int(records), "examples": len(ds), "dropped": int(ds.num_dropped),
            "truncated": int(ds.num_truncated), "first_dropped": ds.first_dropped}


def data_stats_line(stats: dict[str, Any], max_len: str) -> str | None:
    """The one line train, evaluate and ict print when records were dropped or truncated
    (None when none were); `max_len` as the command names it, e.g. "max_len=512"."""
    if not (stats["dropped"] or stats["truncated"]):
        return None
    first = f"; first dropped: {stats['first_dropped']}" if stats["first_dropped"] else ""
    return (f"{stats['records']} records, {stats['dropped']} dropped (prompt longer than "
            f"{max_len}), {stats['truncated']} truncated{first}")
