"""Records, the lowest data module: the `Record` type, its validation, JSON / JSONL files, and
`spec_kind`, the one reading of a data spec string.

A record is a dict ``{"instruction", "input", "output"}`` of ``str``, or a chat record
``{"messages": [{"role", "content"}, ...]}`` (`chat.validate_messages`; ShareGPT's
``{"conversations": [{"from", "value"}, ...]}`` is read as one). Malformed data raises
`DataError` naming the file and the line, never a bare KeyError.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypedDict

from sorted_jax.core.errors import DataError, MissingFileError, SourceError, UserError
from sorted_jax.data.chat import Message, is_chat_record, validate_messages

__all__ = ["REQUIRED_FIELDS", "ChatRecord", "DataError", "Record", "SourceError",
           "iter_jsonl", "read_json_records", "read_utf8", "record_where", "require_file",
           "spec_kind", "validate_record"]

SpecKind = Literal["builtin", "tfds", "file"]


def spec_kind(spec: str) -> SpecKind:
    """What a data spec names: ``"builtin"`` or ``"builtin:FAMILY"`` (the generated toy set, or
    one task family of it), ``"tfds:NAME"`` (a TFDS dataset) or anything else, a JSON / JSONL
    file."""
    if spec == "builtin" or spec.startswith("builtin:"):
        return "builtin"
    if spec.startswith("tfds:"):
        return "tfds"
    return "file"


class Record(TypedDict):
    instruction: str
    input: str
    output: str


class ChatRecord(TypedDict):
    messages: list[Message]


REQUIRED_FIELDS = ("instruction", "output")


class _Located(dict):
    """A record that remembers where it was read ("FILE:LINE: record N"): a plain dict to
    every reader, so a later report (a record dropped as too long) can name its line."""

    where: str = ""


def record_where(record: Any) -> str | None:
    """Where `record` was read, when its source said (JSON files, TFDS), else None."""
    return getattr(record, "where", None) or None


def _located(rec: dict, where: str) -> Any:
    out = _Located(rec)
    out.where = where
    return out


def validate_record(obj: Any, where: str) -> Record | ChatRecord:
    """Check one raw record and return it as a :class:`Record` (``input`` defaults to "") or,
    when it has ``messages`` / ``conversations``, as a :class:`ChatRecord`."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: record is a {type(obj).__name__}, expected a JSON object")
    if is_chat_record(obj):
        return _located(ChatRecord(messages=validate_messages(obj, where)), where)
    for key in REQUIRED_FIELDS:
        if key not in obj:
            raise DataError(f"{where}: record has no {key!r} field (keys: {sorted(obj)}; a "
                            "chat record has 'messages' or 'conversations')")
    rec = {
        "instruction": obj["instruction"],
        "input": obj.get("input", ""),
        "output": obj["output"],
    }
    for key, value in rec.items():
        if not isinstance(value, str):
            kind = type(value).__name__
            raise DataError(f"{where}: field {key!r} is a {kind}, expected a string")
    return _located(Record(**rec), where)


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


def require_file(path: str | Path, what: str, error: type[UserError] = DataError) -> Path:
    """`path` if it is a file; else a `MissingFileError` ("WHAT 'P' not found") or, for a
    directory, `error` saying it is one (it exists: "not found" would mislead)."""
    path = Path(path)
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())[:6]
        raise error(f"{what} {str(path)!r} is a directory (holding {names}), not a file; give "
                    "the file itself")
    if not path.is_file():
        raise MissingFileError(f"{what} {str(path)!r} not found")
    return path


def read_utf8(path: str | Path, error: type[UserError] = DataError) -> str:
    """The text of a UTF-8 file (a BOM is dropped); any other bytes are an `error` naming the
    file and the byte offset, not a bare UnicodeDecodeError."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}): data "
                    "and prompt files must be UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def iter_jsonl(path: str | Path, text: str | None = None, *,
               error: type[UserError] = DataError) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSONL file; a line that is not JSON
    is an `error` naming the file and the line. The one JSONL reader of every command."""
    path = Path(path)
    text = read_utf8(path, error) if text is None else text
    index = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{lineno}: record {index}: invalid JSON: {e.msg}") from None
        yield lineno, value
        index += 1


def _iter_jsonl(text: str, path: Path) -> Iterator[Record]:
    for index, (lineno, obj) in enumerate(iter_jsonl(path, text)):
        yield validate_record(obj, f"{path}:{lineno}: record {index}")


def _refuse_json_object(text: str, path: Path) -> None:
    """A file that is one (pretty-printed) JSON object: valid JSON, but not a record list."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return  # JSONL whose first record spans lines, or broken: the JSONL reader says where
    if isinstance(obj, dict):
        raise DataError(f"{path} holds one JSON object (keys {sorted(obj)[:8]}), not records: "
                        "give a JSON list of records ([{...}, {...}]) or JSONL (one record "
                        "object per line)")


def read_json_records(path: str | Path) -> list[Record]:
    """All records of a JSON list file or a JSONL file (one object per line).

    The format is detected from the content: a file whose first non-blank character is ``[`` is a
    JSON list, anything else is read as JSONL (whatever the extension).
    """
    path = require_file(path, "data file")
    text = read_utf8(path)
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: empty data file")
    if stripped[0] == "{" and "\n" in stripped.strip():
        _refuse_json_object(text, path)
    if stripped[0] == "[":
        records = list(_iter_json_list(text, path))
    else:
        records = list(_iter_jsonl(text, path))
    if not records:
        raise DataError(f"{path}: no records")
    return records
