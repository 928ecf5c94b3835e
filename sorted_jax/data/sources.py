"""Record sources: each yields dicts ``{"instruction", "input", "output"}`` of ``str``.

* a local JSON list file or JSONL file (:func:`read_json_records`);
* a TFDS dataset read as ``array_record`` through ``tfds.data_source`` -- no TensorFlow
  needed -- with a field mapping (:func:`read_tfds_records`);
* ``builtin``: a generated toy instruction set (:mod:`sorted_jax.data.builtin`).

Malformed data raises :class:`DataError` naming the file and the line, never a bare KeyError.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypedDict

import numpy as np


class Record(TypedDict):
    instruction: str
    input: str
    output: str


class SourceError(ValueError):
    """A data source that cannot be opened at all: a missing file, a bad split, an unprepared
    TFDS dataset. The message starts with the spec, so a CLI can prefix its flag name."""


class DataError(ValueError):
    """A malformed record or data file; the message says where."""


REQUIRED_FIELDS = ("instruction", "output")


def validate_record(obj: Any, where: str) -> Record:
    """Check one raw record and return it as a :class:`Record` (``input`` defaults to "")."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: record is a {type(obj).__name__}, expected a JSON object")
    for key in REQUIRED_FIELDS:
        if key not in obj:
            raise DataError(f"{where}: record has no {key!r} field (keys: {sorted(obj)})")
    rec = {
        "instruction": obj["instruction"],
        "input": obj.get("input", ""),
        "output": obj["output"],
    }
    for key, value in rec.items():
        if not isinstance(value, str):
            kind = type(value).__name__
            raise DataError(f"{where}: field {key!r} is a {kind}, expected a string")
    return Record(**rec)


class _LineCounter:
    """Line number of a position in ``text``, counted incrementally (positions only grow)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def __call__(self, pos: int) -> int:
        if pos < self.pos:
            return self.text.count("\n", 0, pos) + 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _iter_json_list(text: str, path: Path) -> Iterator[Record]:
    """Records of a JSON list, each checked with the line where it starts."""
    decoder = json.JSONDecoder()
    n = len(text)
    _line_of = _LineCounter(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(text.index("[") + 1)
    index = 0
    if pos < n and text[pos] == "]":
        return
    while True:
        line = _line_of(pos)
        where = f"{path}:{line}: record {index}"
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: record {index}: invalid JSON: {e.msg}") from None
        yield validate_record(obj, where)
        index += 1
        pos = skip_ws(pos)
        if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
        elif pos < n and text[pos] == "]":
            if skip_ws(pos + 1) != n:
                raise DataError(f"{path}:{_line_of(pos + 1)}: trailing data after the list")
            return
        else:
            raise DataError(
                f"{path}:{_line_of(pos)}: after record {index - 1}: expected ',' or ']'"
            )


def _iter_jsonl(text: str, path: Path) -> Iterator[Record]:
    index = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: record {index}: invalid JSON: {e.msg}") from None
        yield validate_record(obj, f"{path}:{lineno}: record {index}")
        index += 1


def read_json_records(path: str | Path) -> list[Record]:
    """All records of a JSON list file or a JSONL file (one object per line).

    The format is detected from the content: a file whose first non-blank character is ``[`` is a
    JSON list, anything else is read as JSONL (whatever the extension).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} not found")
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: empty data file")
    if stripped[0] == "[":
        records = list(_iter_json_list(text, path))
    else:
        records = list(_iter_jsonl(text, path))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _to_str(value: Any) -> Any:
    """TFDS text features come back as bytes (or 0-d numpy arrays of bytes)."""
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


def map_fields(example: Mapping[str, Any], field_map: Mapping[str, str], where: str) -> Record:
    """Build a record from a source example; ``field_map`` maps our field -> source feature.

    ``instruction`` and ``output`` must be mapped; ``input`` is optional ("" when not mapped).
    """
    raw: dict[str, Any] = {}
    for ours, theirs in field_map.items():
        if ours not in ("instruction", "input", "output"):
            raise ValueError(f"field_map key {ours!r} is not one of instruction/input/output")
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
    instruction/input/output to feature names, nested features as ``"a/b"``.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "TFDS sources need tensorflow-datasets: pip install 'sorted_jax[tfds]'"
        ) from e
    if name.startswith("stanford_alpaca"):
        import sorted_jax.data.alpaca_tfds  # noqa: F401  (registers the builder: tfds finds it)
    field_map = dict(DEFAULT_FIELD_MAP if field_map is None else field_map)
    source = tfds.data_source(name, split=split, data_dir=data_dir)
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
      picks the generated examples;
    * ``"tfds:NAME"`` -- a TFDS dataset, ``split``/``data_dir``/``field_map`` passed through;
    * anything else -- a path to a JSON list or JSONL file (``split`` is ignored: give the
      held-out file as its own spec, or use :func:`holdout_split`).
    """
    if spec == "builtin":
        from sorted_jax.data.builtin import builtin_records

        return builtin_records(split, seed=seed)
    if spec.startswith("tfds:"):
        return read_tfds_records(spec[5:], split, data_dir=data_dir, field_map=field_map)
    return read_json_records(spec)


def holdout_split(
    records: list[Record], num_eval: int, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Split one record list into disjoint (train, eval) parts, deterministically from ``seed``.

    For sources with no held-out split of their own (Stanford Alpaca has only ``train``).
    """
    if not 0 < num_eval < len(records):
        raise ValueError(f"num_eval={num_eval} must be in (0, {len(records)})")
    perm = np.random.default_rng(seed).permutation(len(records))
    eval_idx = np.sort(perm[:num_eval])
    train_idx = np.sort(perm[num_eval:])
    return [records[i] for i in train_idx], [records[i] for i in eval_idx]


def open_records(spec: str, split: str = "train", *, data_dir: str | None = None,
                 seed: int = 0) -> list[Record]:
    """`load_records` for command lines: the Stanford Alpaca TFDS builder registered, and a
    missing file or an unreadable source raised as `SourceError` (malformed records still
    raise `DataError` naming file and line)."""
    is_file = spec != "builtin" and not spec.startswith("tfds:")
    path = Path(spec).expanduser() if is_file else None
    if path is not None and not path.is_file():
        raise SourceError(f"{spec!r}: data file not found (expected 'builtin', 'tfds:NAME' or a "
                          "JSON/JSONL file of {instruction, input, output} records)")
    try:
        source = str(path) if path is not None else spec  # '~' expanded for the reader too
        return load_records(source, split, data_dir=data_dir, seed=seed)
    except (DataError, FileNotFoundError):
        raise
    except ImportError as e:
        raise SourceError(f"{spec!r}: {e} (or give a JSON/JSONL file instead)") from e
    except Exception as e:  # a bad split, a TFDS dataset never prepared
        raise SourceError(f"{spec!r} (split {split!r}) cannot be read: "
                          f"{type(e).__name__}: {e}") from e
