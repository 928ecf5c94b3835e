"""A toy instruction dataset generated from a seed, so the default job needs no download.

Short string tasks (reverse, sort, shift letters, add numbers, ...) with and without an ``input``
field, with the byte tokenizer. In the default job's 600 CPU steps an 8-layer width-128 model
learns only part of it (counting, first letters, which letters occur: held-out token accuracy
~0.3-0.4); the copy-like tasks (copy, reverse, shift, uppercase) need much longer training, so
the set does not saturate and exits stay distinguishable. Train and eval are disjoint: each
(instruction, input) pair goes to eval iff a stable hash of it falls in one bucket of
``EVAL_BUCKETS``, independent of seed and split sizes.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Callable

import numpy as np

from sorted_jax.data.records import Record, SourceError

LETTERS = string.ascii_lowercase
EVAL_BUCKETS = 10
NUM_TRAIN = 4000
NUM_EVAL = 1000


def _word(rng: np.random.Generator, lo: int = 3, hi: int = 6) -> str:
    n = int(rng.integers(lo, hi + 1))
    return "".join(LETTERS[int(i)] for i in rng.integers(0, 26, size=n))


def _shift(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


def _reverse(rng):
    w = _word(rng)
    return "Reverse the word.", w, w[::-1]


def _sort(rng):
    w = _word(rng)
    return "Sort the letters.", w, "".join(sorted(w))


def _copy(rng):
    w = _word(rng)
    return "Copy the text.", w, w


def _first(rng):
    w = _word(rng)
    return "First letter of the word.", w, w[0]


def _shift_task(rng):
    w = _word(rng)
    return "Shift each letter by one.", w, _shift(w)


def _upper(rng):
    w = _word(rng)
    return f"Uppercase: {w}", "", w.upper()


def _add(rng):
    a, b = (int(x) for x in rng.integers(0, 50, size=2))
    return f"Add: {a} + {b}", "", str(a + b)


def _count(rng):
    w = _word(rng, 2, 9)
    return f"Count the letters: {w}", "", str(len(w))


def _repeat(rng):
    w = _word(rng)
    return f"Repeat twice: {w}", "", f"{w} {w}"


TASKS: tuple[Callable[[np.random.Generator], tuple[str, str, str]], ...] = (
    _reverse,
    _sort,
    _copy,
    _first,
    _shift_task,
    _upper,
    _add,
    _count,
    _repeat,
)


# Two disjoint task families, for the pretrained-then-SoFT demo: a model is first trained on
# `pretrain` (string manipulation), then fine-tuned on `instruct` (tasks it has not seen, that
# reuse what it learned: reading letters, counting, copying).
FAMILIES: dict[str, tuple[Callable[[np.random.Generator], tuple[str, str, str]], ...]] = {
    "all": TASKS,
    "pretrain": (_reverse, _sort, _copy, _shift_task, _upper, _add),
    "instruct": (_first, _count, _repeat),
}


def is_eval_key(instruction: str, input: str) -> bool:
    """Whether this prompt belongs to the held-out split (stable across runs and machines)."""
    digest = hashlib.sha256(f"{instruction}\x00{input}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % EVAL_BUCKETS == 0


def builtin_records(
    split: str = "train", seed: int = 0, num_train: int = NUM_TRAIN, num_eval: int = NUM_EVAL,
    family: str = "all",
) -> list[Record]:
    """The generated ``train`` (may repeat a prompt) or ``eval`` (unique prompts) split of a
    task family (`FAMILIES`; "all" is the default job's set)."""
    if split not in ("train", "eval"):
        raise SourceError(f"builtin dataset has splits 'train' and 'eval', not {split!r}")
    if family not in FAMILIES:
        raise SourceError(f"builtin dataset has task families {', '.join(FAMILIES)}, not "
                          f"{family!r} (e.g. builtin:instruct)")
    tasks = FAMILIES[family]
    want_eval = split == "eval"
    count = num_eval if want_eval else num_train
    rng = np.random.default_rng([seed, int(want_eval)])
    records: list[Record] = []
    seen: set[tuple[str, str]] = set()
    for _ in range(200 * count + 1000):
        if len(records) == count:
            return records
        task = tasks[int(rng.integers(len(tasks)))]
        instruction, input_, output = task(rng)
        if is_eval_key(instruction, input_) != want_eval:
            continue
        if want_eval:
            if (instruction, input_) in seen:
                continue
            seen.add((instruction, input_))
        records.append(Record(instruction=instruction, input=input_, output=output))
    raise RuntimeError(f"could not generate {count} builtin {split} records")
