"""Small parsers the command lines share (errors are `UsageError`s, reported by `run_cli`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from sorted_jax.core.errors import UsageError
from sorted_jax.data import DataError, Record, SourceError, open_records, split_records
from sorted_jax.parallel import sharding


def parse_mesh(text: str, flag: str = "--mesh") -> Mesh:
    """A (data, fsdp, tensor) mesh from "1,-1,1"; a shape without -1 that needs fewer devices
    than there are uses the first ones."""
    try:
        shape = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} must be three integers data,fsdp,tensor, got {text!r}") from None
    devices = jax.devices()
    if len(shape) == 3 and -1 not in shape and math.prod(shape) < len(devices):
        devices = devices[:math.prod(shape)]
    return sharding.make_mesh(shape, devices)


def parse_numbers(values: Sequence[str] | None, cast: Callable[[str], Any], what: str
                  ) -> list | None:
    """Comma- or space-separated numbers from repeated CLI values; None when not given."""
    if values is None:
        return None
    out = []
    for v in values:
        for part in str(v).replace(",", " ").split():
            try:
                out.append(cast(part))
            except ValueError:
                raise UsageError(f"{what}, got {part!r}") from None
    return out


def open_split_records(spec: str, split: str, *, holdout: int = 0, seed: int = 0,
                       limit: int = 0) -> list[Record]:
    """`data.open_split` with errors naming the flags `--data` and `--holdout`."""
    try:
        records = open_records(spec, split, seed=seed)
    except SourceError as e:
        raise e.prefixed("--data ") from None
    try:
        records = split_records(records, spec, split, holdout=holdout, seed=seed)
    except DataError as e:
        raise e.prefixed(f"--holdout {holdout}: ") from None
    return records[:limit] if limit else records
