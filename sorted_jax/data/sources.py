"""Record sources: each yields `Record`s ``{"instruction", "input", "output"}`` of ``str`` (or
chat records ``{"messages": [...]}``, `records.validate_record`).

* a local JSON list file or JSONL file (`records.read_json_records`);
* a TFDS dataset read as ``array_record`` through ``tfds.data_source`` -- no TensorFlow
  needed -- with a field mapping (:func:`read_tfds_records`);
* ``builtin``: a generated toy instruction set (:mod:`sorted_jax.data.builtin`).

`load_records` reads a spec string (`records.spec_kind`); `open_records` / `open_split` are its
command-line forms (a missing file or an unreadable source is a `SourceError`).
Malformed data raises :class:`DataError` naming the file and the line, never a bare KeyError.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sorted_jax.data import alpaca_tfds
from sorted_jax.data.builtin import builtin_records
from sorted_jax.data.chat import CHAT_FIELDS, is_chat_record
from sorted_jax.data.records import (
    DataError,
    Record,
    SourceError,
    read_json_records,
    spec_kind,
    validate_record,
)

__all__ = ["DataError", "Record", "SourceError", "holdout_split", "load_records", "map_fields",
           "open_records", "open_split", "open_split_records", "read_json_records",
           "read_tfds_records",
           "split_records"]


def _to_str(value: Any) -> Any:
    """TFDS text features come back as bytes (or 0-d numpy arrays of bytes); a sequence of
    dicts (a conversation) as a dict of arrays, turned back into a list of dicts here."""
    if isinstance(value, Mapping):
        value = {k: _to_str(v) for k, v in value.items()}
        lengths = {len(v) for v in value.values() if isinstance(v, list)}
        if len(lengths) == 1 and all(isinstance(v, list) for v in value.values()):
            n = lengths.pop()
            return [{k: v[i] for k, v in value.items()} for i in range(n)]
        return value
    if isinstance(value, np.ndarray) and value.ndim >= 1:
        return [_to_str(v) for v in value]
    if isinstance(value, list | tuple):
        return [_to_str(v) for v in value]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, np.str_):
        return str(value)
    return value


def _get_path(example: Mapping[str, Any], key: str) -> Any:
    """``example["a"]["b"]`` for ``key="a/b"`` (TFDS nests features)."""
    value: Any = example
    for part in key.split("/"):
        value = value[part]
    return value


MAPPABLE_FIELDS = ("instruction", "input", "output", "messages", "conversations")


def map_fields(example: Mapping[str, Any], field_map: Mapping[str, str], where: str) -> Record:
    """Build a record from a source example; ``field_map`` maps our field -> source feature.

    ``instruction`` and ``output`` must be mapped; ``input`` is optional ("" when not mapped).
    A chat source maps ``messages`` (OpenAI roles) or ``conversations`` (ShareGPT) instead.
    """
    raw: dict[str, Any] = {}
    for ours, theirs in field_map.items():
        if ours not in MAPPABLE_FIELDS:
            raise DataError(f"field_map key {ours!r} is not one of {'/'.join(MAPPABLE_FIELDS)}")
        try:
            raw[ours] = _to_str(_get_path(example, theirs))
        except (KeyError, TypeError):
            keys = sorted(example) if isinstance(example, Mapping) else type(example).__name__
            raise DataError(f"{where}: no feature {theirs!r} (for {ours!r}); has {keys}") from None
    return validate_record(raw, where)


DEFAULT_FIELD_MAP = {"instruction": "instruction", "input": "input", "output": "output"}


def read_tfds_records(
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    field_map: Mapping[str, str] | None = None,
) -> list[Record]:
    """Records of a prepared TFDS dataset in ``array_record`` format, without TensorFlow.

    ``name`` is a TFDS name (``"alpaca"``, ``"my_ds/config:1.0.0"``); ``field_map`` maps
    instruction/input/output (or messages / conversations) to feature names, nested features as
    ``"a/b"``. Without one, a dataset with a ``messages`` or ``conversations`` feature is read
    as chat records, any other by its instruction/input/output features.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "TFDS sources need tensorflow-datasets: pip install 'sorted_jax[tfds]'"
        ) from e
    if name.startswith(alpaca_tfds.NAME):
        alpaca_tfds.register()  # tfds finds a builder by its registered name
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # TFDS's own errors: a bad split, a dataset never prepared
        raise SourceError(f"'tfds:{name}' (split {split!r}) cannot be read: "
                          f"{type(e).__name__}: {e}") from e
    if field_map is None and len(source) and is_chat_record(source[0]):
        field = next(k for k in CHAT_FIELDS if k in source[0])  # a conversation feature
        field_map = {field: field}
    field_map = dict(DEFAULT_FIELD_MAP if field_map is None else field_map)
    return [
        map_fields(source[i], field_map, f"tfds:{name}[{split}] example {i}")
        for i in range(len(source))
    ]


def load_records(
    spec: str,
    split: str = "train",
    *,
    data_dir: str | None = None,
    field_map: Mapping[str, str] | None = None,
    seed: int = 0,
) -> list[Record]:
    """Records named by a spec string.

    * ``"builtin"`` -- the generated toy set; ``split`` is ``"train"`` or ``"eval"``, ``seed``
      picks the generated examples; ``"builtin:pretrain"`` / ``"builtin:instruct"`` one of its
      two disjoint task families (the pretrained-then-SoFT demo);
    * ``"tfds:NAME"`` -- a TFDS dataset, ``split``/``data_dir``/``field_map`` passed through;
    * anything else -- a path to a JSON list or JSONL file (``split`` is ignored: give the
      held-out file as its own spec, or use :func:`holdout_split`).
    """
    kind = spec_kind(spec)
    if kind == "builtin":
        return builtin_records(split, seed=seed, family=spec.partition(":")[2] or "all")
    if kind == "tfds":
        return read_tfds_records(spec[5:], split, data_dir=data_dir, field_map=field_map)
    return read_json_records(spec)


def holdout_split(
    records: list[Record], num_eval: int, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Split one record list into disjoint (train, eval) parts, deterministically from ``seed``.

    For sources with no held-out split of their own (Stanford Alpaca has only ``train``).
    """
    if not 0 < num_eval < len(records):
        raise DataError(f"num_eval={num_eval} must be in (0, {len(records)})")
    perm = np.random.default_rng(seed).permutation(len(records))
    eval_idx = np.sort(perm[:num_eval])
    train_idx = np.sort(perm[num_eval:])
    return [records[i] for i in train_idx], [records[i] for i in eval_idx]


def open_records(spec: str, split: str = "train", *, data_dir: str | None = None,
                 seed: int = 0) -> list[Record]:
    """`load_records` for command lines: a missing file or an unreadable source raised as
    `SourceError` (malformed records still raise `DataError` naming file and line)."""
    path = Path(spec).expanduser() if spec_kind(spec) == "file" else None
    if path is not None and path.is_dir():
        raise SourceError(f"{spec!r} is a directory, not a data file (give the JSON/JSONL file "
                          "itself, 'builtin' or 'tfds:NAME')")
    if path is not None and not path.is_file():
        raise SourceError(f"{spec!r}: data file not found (expected 'builtin', 'tfds:NAME' or a "
                          "JSON/JSONL file of {instruction, input, output} records)")
    source = str(path) if path is not None else spec  # '~' expanded for the reader too
    try:
        return load_records(source, split, data_dir=data_dir, seed=seed)
    except ImportError as e:
        raise SourceError(f"{spec!r}: {e} (or give a JSON/JSONL file instead)") from e


def split_records(records: list[Record], spec: str, split: str, *, holdout: int = 0,
                  seed: int = 0) -> list[Record]:
    """For a JSON file with `holdout` > 0: the held-out (eval) part of `records` or the rest
    (train), split as training's `data.eval_holdout` does; other sources are returned whole."""
    if spec_kind(spec) != "file" or holdout <= 0:
        return records
    train, held = holdout_split(records, holdout, seed)
    return held if split == "eval" else train


def open_split(spec: str, split: str, *, holdout: int = 0, seed: int = 0, limit: int = 0,
               data_dir: str | None = None) -> list[Record]:
    """`open_records` then `split_records`; the first `limit` records if > 0."""
    records = open_records(spec, split, data_dir=data_dir, seed=seed)
    records = split_records(records, spec, split, holdout=holdout, seed=seed)
    return records[:limit] if limit else records


def open_split_records(spec: str, split: str, *, holdout: int = 0, seed: int = 0,
                       limit: int = 0) -> list[Record]:
    """`open_split` for a command line: errors name the flags `--data` and `--holdout`."""
    try:
        records = open_records(spec, split, seed=seed)
    except SourceError as e:
        raise e.prefixed("--data ") from None
    try:
        records = split_records(records, spec, split, holdout=holdout, seed=seed)
    except DataError as e:
        raise e.prefixed(f"--holdout {holdout}: ") from None
    return records[:limit] if limit else records
