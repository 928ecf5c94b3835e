"""TriviaQA closed-book QA: the official JSON format, the prompt, exact match per exit.

    items = load_triviaqa("verified-web-dev.json", limit=500)
    prompt = format_question(items[0].question)     # "Question: ...\\nAnswer:"
    exact_match("The Sunset Boulevard.", items[0].answers)  # True

Exact match follows the official evaluation script (mandarjoshi90/triviaqa,
`evaluation/triviaqa_evaluation.py`): both sides are normalised (underscores -> spaces,
lower-case, punctuation incl. ‘ ’ ´ ` -> spaces, articles a/an/the removed, whitespace
collapsed), and a prediction counts if it equals any normalised alias. The model's answer is the
greedy continuation of the prompt cut at the first newline (generation also stops there).
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sorted_jax.core.errors import TriviaQAError
from sorted_jax.data.records import read_utf8, require_file
from sorted_jax.data.templates import format_prompt
from sorted_jax.data.tokenizers import bos_prefix

PROMPT = "Question: {question}\nAnswer:"
_PUNCT = frozenset(string.punctuation + "‘’´`")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """The official TriviaQA normalisation (see the module doc)."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split()).strip()


def exact_match(prediction: str, answers: Iterable[str]) -> bool:
    """True if the normalised prediction equals any normalised answer alias."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def clean_prediction(text: str) -> str:
    """The answer part of a generation: up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def format_question(question: str, template: str | None = None) -> str:
    """`Question: ...\\nAnswer:`; with a training template name, wrapped as its instruction."""
    prompt = PROMPT.format(question=question.strip())
    if template in (None, "", "raw", "none"):
        return prompt
    return format_prompt(prompt, "", template)


@dataclasses.dataclass(frozen=True)
class TriviaQAItem:
    question: str
    # Value, Aliases, NormalizedAliases (the official ground truths) and HumanAnswers, deduped
    answers: tuple[str, ...]
    question_id: str = ""


def _answers(answer: Mapping[str, Any], where: str) -> tuple[str, ...]:
    out: list[str] = []
    for key in ("Value", "NormalizedValue"):
        v = answer.get(key)
        if isinstance(v, str) and v.strip():
            out.append(v)
    for key in ("Aliases", "NormalizedAliases", "HumanAnswers"):
        vals = answer.get(key, [])
        if not isinstance(vals, list) or not all(isinstance(v, str) for v in vals):
            raise TriviaQAError(f"{where}: Answer.{key} must be a list of strings")
        out.extend(vals)
    out = [a for a in dict.fromkeys(out) if normalize_answer(a)]
    if not out:
        raise TriviaQAError(f"{where}: the answer has no Value or Aliases")
    return tuple(out)


def parse_triviaqa(data: Any, source: str = "<data>") -> list[TriviaQAItem]:
    """Items from a parsed official TriviaQA JSON object `{"Data": [...]}`."""
    if not isinstance(data, Mapping) or not isinstance(data.get("Data"), list):
        kind = (f"an object with keys {sorted(data)[:8]}" if isinstance(data, Mapping)
                else f"a JSON {type(data).__name__}")
        raise TriviaQAError(f"{source}: expected the official TriviaQA format "
                            '{"Data": [{"Question": ..., "Answer": {...}}, ...]}, got ' + kind)
    items = []
    for i, rec in enumerate(data["Data"]):
        where = f"{source}: Data[{i}]"
        if not isinstance(rec, Mapping):
            raise TriviaQAError(f"{where}: expected an object, got a {type(rec).__name__}")
        q = rec.get("Question")
        if not isinstance(q, str) or not q.strip():
            raise TriviaQAError(f"{where}: no 'Question' string (keys: {sorted(rec)[:8]})")
        ans = rec.get("Answer")
        if not isinstance(ans, Mapping):
            raise TriviaQAError(f"{where}: no 'Answer' object (the test split without answers "
                                "cannot be scored)")
        items.append(TriviaQAItem(q.strip(), _answers(ans, where), str(rec.get("QuestionId",
                                                                                  ""))))
    if not items:
        raise TriviaQAError(f"{source}: 'Data' is empty")
    return items


def load_triviaqa(path: str | Path, limit: int | None = None) -> list[TriviaQAItem]:
    """Questions with their answer aliases from an official TriviaQA JSON file."""
    p = require_file(path, "TriviaQA file", TriviaQAError)
    try:
        data = json.loads(read_utf8(p, TriviaQAError))
    except json.JSONDecodeError as e:
        raise TriviaQAError(f"{p}:{e.lineno}: not valid JSON: {e.msg}") from None
    items = parse_triviaqa(data, str(p))
    return items[:limit] if limit else items


def newline_stop_ids(tokenizer: Any) -> list[int]:
    """Token ids (besides EOS) that end an answer: the ones whose text contains a newline."""
    cands: set[int] = set()
    for text in ("\n", "a\n", "a.\n", " \n"):
        ids = tokenizer.encode(text)
        if ids:
            cands.add(int(ids[-1]))
    return sorted(t for t in cands if "\n" in tokenizer.decode([t]))


def score(predictions: Sequence[str], items: Sequence[TriviaQAItem]) -> float:
    """Exact match (fraction) of raw generations against the items' aliases."""
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} questions")
    hits = [exact_match(clean_prediction(p), it.answers) for p, it in zip(
        predictions, items, strict=True)]
    return sum(hits) / max(len(hits), 1)


def evaluate_generations(generate: Callable[[list[list[int]]], list[list[int] | None]],
                         tokenizer: Any, items: Sequence[TriviaQAItem], *,
                         batch_size: int = 16, template: str | None = None,
                         ) -> dict[str, Any]:
    """EM of one generator (prompt ids -> new ids) on `items`, with per-question predictions.

    The generator may answer None for a prompt it cannot run (longer than the model's
    context): that question counts as wrong and is reported in `skipped`.
    """
    prompts = [[*bos_prefix(tokenizer), *tokenizer.encode(format_question(it.question, template))]
               for it in items]
    texts: list[str | None] = []
    for i in range(0, len(prompts), batch_size):
        for toks in generate(prompts[i:i + batch_size]):
            texts.append(None if toks is None else tokenizer.decode(toks))
    preds = ["" if t is None else clean_prediction(t) for t in texts]
    hits = [t is not None and exact_match(p, it.answers)
            for p, t, it in zip(preds, texts, items, strict=True)]
    return {"em": sum(hits) / len(items), "num_questions": len(items),
            "skipped": sum(t is None for t in texts),
            "predictions": [{"question_id": it.question_id, "question": it.question,
                             "prediction": p, "correct": bool(h), **({"skipped": True} if t is None
                                                                     else {})}
                            for it, p, t, h in zip(items, preds, texts, hits, strict=True)]}


__all__ = ["PROMPT", "TriviaQAError", "TriviaQAItem", "clean_prediction", "evaluate_generations",
           "exact_match", "format_question", "load_triviaqa", "newline_stop_ids",
           "normalize_answer", "parse_triviaqa", "score"]
