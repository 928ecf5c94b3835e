"""Judge inputs from a `--dump-generations` file (`python -m sorted_jax.evaluate pair`).

Each line of a dump is one (instruction, exit, checkpoint) response; `make_pairs` joins two of
those columns (`LABEL:EXIT`) on the instruction id into the PandaLM-style judge input
{instruction, input, response1, response2}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sorted_jax.core.errors import EvalError
from sorted_jax.data.records import iter_jsonl
from sorted_jax.io import destinations


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        raise EvalError(f"--gens {str(p)!r} is a directory; give the --dump-generations file")
    if not p.is_file():
        raise EvalError(f"--gens file {str(p)!r} not found")
    rows = []
    need = ("id", "label", "exit", "instruction", "response")
    for n, row in iter_jsonl(p, error=EvalError):
        if not isinstance(row, dict) or any(k not in row for k in need):
            raise EvalError(f"{p}:{n}: not a --dump-generations line (needs {list(need)})")
        rows.append(row)
    if not rows:
        raise EvalError(f"{p} holds no generations")
    return rows


def _column(text: str, flag: str) -> tuple[str, int]:
    label, sep, exit_text = text.rpartition(":")
    if not sep or not label:
        raise EvalError(f"{flag} must be LABEL:EXIT, e.g. soft:4, got {text!r}")
    try:
        return label, int(exit_text)
    except ValueError:
        raise EvalError(f"{flag} {text!r}: the exit must be a layer number") from None


def make_pairs(rows: Sequence[Mapping[str, Any]], a: tuple[str, int], b: tuple[str, int]
               ) -> list[dict[str, Any]]:
    """Judge inputs {instruction, input, response1 (a), response2 (b)} for shared ids."""
    cols: dict[tuple[str, int], dict[int, Mapping[str, Any]]] = {}
    for r in rows:
        cols.setdefault((str(r["label"]), int(r["exit"])), {})[int(r["id"])] = r
    for name, key in (("--a", a), ("--b", b)):
        if key not in cols:
            have = ", ".join(f"{lab}:{e}" for lab, e in sorted(cols))
            raise EvalError(f"{name} {key[0]}:{key[1]} is not in the generations (have: {have})")
    out = []
    for i in sorted(set(cols[a]) & set(cols[b])):
        ra, rb = cols[a][i], cols[b][i]
        if ra.get("skipped") or rb.get("skipped"):  # prompt longer than a model's context
            continue
        if (ra["instruction"], ra.get("input", "")) != (rb["instruction"], rb.get("input", "")):
            raise EvalError(f"generation id {i} has different instructions for "
                            f"{a[0]}:{a[1]} and {b[0]}:{b[1]}: dumps of different data?")
        out.append({"id": i, "instruction": ra["instruction"], "input": ra.get("input", ""),
                    "response1": ra["response"], "response2": rb["response"],
                    "model1": f"{a[0]}:{a[1]}", "model2": f"{b[0]}:{b[1]}"})
    if not out:
        raise EvalError(f"{a[0]}:{a[1]} and {b[0]}:{b[1]} share no instruction id")
    return out


# A file `write_pairs` wrote: its first line is one judge input.
_is_pairs_file = destinations.jsonl_with_keys("response1", "response2")


def write_pairs(gens: str, a: str, b: str, out: str, *, overwrite: bool = False) -> None:
    """The judge inputs for columns `a` and `b` (LABEL:EXIT) of the dump `gens`, into `out`:
    a new file, or with `overwrite` one this wrote before (never the dump itself)."""
    dest = destinations.claim_file(out, flag="--out", command="sorted_jax.evaluate pair",
                                   inputs=[gens], overwrite=overwrite, recognise=_is_pairs_file)
    pairs = make_pairs(read_generations(gens), _column(a, "--a"), _column(b, "--b"))
    with destinations.atomic_file(dest) as f:
        f.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in pairs))
    print(f"wrote {len(pairs)} pairs ({a} vs {b}) to {out}")
