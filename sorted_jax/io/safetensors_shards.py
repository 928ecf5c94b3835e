"""HF's sharded safetensors layout, written with the `safetensors` library one shard at a time.

One file `model.safetensors` when everything fits in one shard, else
`model-0000i-of-0000N.safetensors` files plus `model.safetensors.index.json` (which shard holds
which tensor), the layout `transformers`' `save_pretrained` writes and `from_pretrained` reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from sorted_jax.core.errors import ConversionError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# transformers refuses to load a safetensors file whose metadata does not name its format.
METADATA = {"format": "pt"}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'2GB' (10^9), '2GiB' (2^30), '500MB', '20KB', '1000' -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ConversionError(f"cannot parse size {text!r}; use e.g. 2GB, 500MB, 4GiB")
    value, unit = float(m.group(1)), (m.group(2) or "b").lower()
    base = 1024 if "i" in unit else 1000
    power = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
    size = int(value * base ** power)
    if size <= 0:
        raise ConversionError(f"shard size must be positive, got {text!r}")
    return size


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy HF-style sharding of (name, bytes) in order: a new shard starts when the next
    tensor would overflow this one (a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file(i: int, count: int) -> str:
    """The file name of shard `i` (from 0) of `count`."""
    return SAFE_SINGLE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def write_shard(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """One safetensors file. The library reads each array's buffer as it is laid out in memory,
    so a non-contiguous view would be written scrambled: refuse it here."""
    strided = [name for name, w in tensors.items() if not w.flags.c_contiguous]
    if strided:
        raise ValueError(f"tensors must be C-contiguous to be written: {strided}")
    save_file(dict(tensors), path, metadata=METADATA)


def write_shards(out_dir: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int,
                 progress: Any = None) -> dict[str, str]:
    """Write `tensors` (C-contiguous, in file order) as one file or as shards plus index into
    `out_dir`; returns the weight map (tensor -> file).

    `tensors` is consumed: each shard's arrays leave the dict once written, so memory held for
    arrays made only to be written shrinks shard by shard. `progress` (a tqdm bar in bytes)
    advances per shard."""
    shards = plan_shards([(n, w.nbytes) for n, w in tensors.items()], max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        fname = shard_file(i, len(shards))
        shard = {name: tensors.pop(name) for name in names}
        write_shard(out_dir / fname, shard)
        nbytes = sum(w.nbytes for w in shard.values())
        total += nbytes
        del shard
        weight_map.update(dict.fromkeys(names, fname))
        if progress is not None:
            progress.update(nbytes)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map

