"""`python -m sorted_jax.evaluate pair`: judge inputs from a `--dump-generations` file.

    python -m sorted_jax.evaluate pair --gens gens.jsonl --a soft:4 --b sft:8 --out pairs.jsonl

Each line of a dump is one (instruction, exit, checkpoint) response; `make_pairs` joins two of
those columns (`LABEL:EXIT`) on the instruction id into the PandaLM-style judge input
{instruction, input, response1, response2}.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sorted_jax.core.errors import EvalError, run_cli
from sorted_jax.data.records import iter_jsonl
from sorted_jax.io import destinations


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sorted_jax.evaluate pair",
        description="Judge input {instruction, input, response1, response2} (PandaLM style) "
                    "for 'exit a of model X vs exit b of model Y' from a --dump-generations "
                    "file.")
    p.add_argument("--gens", required=True, help="JSONL from --dump-generations")
    p.add_argument("--a", required=True, help="LABEL:EXIT of response1, e.g. soft:4")
    p.add_argument("--b", required=True, help="LABEL:EXIT of response2, e.g. sft:8")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of evaluate pair at --out")
    return run_cli("sorted_jax.evaluate pair", write_pairs, p.parse_args(argv))


# A file `write_pairs` wrote: its first line is one judge input.
_is_pairs_file = destinations.jsonl_with_keys("response1", "response2")


def write_pairs(args: argparse.Namespace) -> None:
    dest = destinations.claim_file(args.out, flag="--out", command="sorted_jax.evaluate pair",
                                   inputs=[args.gens], overwrite=args.overwrite,
                                   recognise=_is_pairs_file)
    pairs = make_pairs(read_generations(args.gens), _column(args.a, "--a"),
                       _column(args.b, "--b"))
    with destinations.atomic_file(dest) as f:
        f.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in pairs))
    print(f"wrote {len(pairs)} pairs ({args.a} vs {args.b}) to {args.out}")
