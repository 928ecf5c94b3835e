"""TriviaQA: official normalisation and exact match, the official JSON format, stop ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sorted_jax.evaluation.triviaqa import (
    TriviaQAError,
    clean_prediction,
    evaluate_generations,
    exact_match,
    format_question,
    load_triviaqa,
    newline_stop_ids,
    normalize_answer,
    parse_triviaqa,
    score,
)

ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets"
SAMPLE = ASSETS / "triviaqa_sample.json"


@pytest.mark.parametrize("text,expected", [
    ("Sunset Boulevard", "sunset boulevard"),
    ("The Sunset Boulevard.", "sunset boulevard"),
    ("  Sunset   Blvd. ", "sunset blvd"),
    ("Sunset_Boulevard", "sunset boulevard"),  # underscores, as in Wikipedia titles
    ("an apple a day", "apple day"),
    ("A.B.C.", "b c"),  # punctuation becomes spaces, then the lone 'a' is an article
    ("Theatre of the Absurd", "theatre of absurd"),  # 'the' inside a word stays
    ("‘Quoted’ ´word` ", "quoted word"),  # the extra quote marks of the official script
    ("Rock 'n' Roll!", "rock n roll"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_hand_made():
    answers = ["Sunset Boulevard", "Sunset Blvd."]
    assert exact_match("sunset blvd", answers)
    assert exact_match("The SUNSET boulevard!", answers)
    assert not exact_match("Sunset", answers)  # exact, not substring
    assert not exact_match("Sunset Boulevard is the answer", answers)
    assert not exact_match("", answers)
    assert exact_match("  Cats ", ["cats"])


def test_clean_prediction_and_prompt():
    assert clean_prediction(" Sunset Boulevard\nQuestion: next") == "Sunset Boulevard"
    assert clean_prediction("\nParis") == ""
    assert format_question(" Who? ") == "Question: Who?\nAnswer:"
    wrapped = format_question("Who?", "plain")
    assert wrapped == "Question: Who?\nAnswer:\n"


def test_real_sample_record():
    if not SAMPLE.is_file():
        pytest.skip(f"{SAMPLE} not found")
    items = load_triviaqa(SAMPLE)
    assert len(items) == 1
    it = items[0]
    assert it.question == ("Which Lloyd Webber musical premiered in the US on 10th December "
                           "1993?")
    assert it.question_id == "tc_33"
    assert "Sunset Boulevard" in it.answers and "sunset bulevard" in it.answers
    for pred in ("Sunset Boulevard", "sunset blvd.", "The Sunset Boulevard",
                 "West Sunset Boulevard", "Sunset Blvd"):
        assert exact_match(pred, it.answers), pred
    for pred in ("Sunset", "Evita", "Cats", "Sunset Boulevard (musical)"):
        assert not exact_match(pred, it.answers), pred
    assert score([" Sunset Blvd.\nQuestion: ..."], items) == 1.0
    assert score(["Evita"], items) == 0.0


def test_parse_errors(tmp_path):
    with pytest.raises(TriviaQAError, match="official TriviaQA format"):
        parse_triviaqa([{"Question": "q"}], "f.json")
    with pytest.raises(TriviaQAError, match="official TriviaQA format"):
        parse_triviaqa({"data": []}, "f.json")
    with pytest.raises(TriviaQAError, match=r"Data\[0\]: no 'Answer'"):
        parse_triviaqa({"Data": [{"Question": "q"}]}, "f.json")
    with pytest.raises(TriviaQAError, match=r"Data\[1\]: no 'Question'"):
        parse_triviaqa({"Data": [{"Question": "q", "Answer": {"Value": "x"}}, {"Answer": {}}]})
    with pytest.raises(TriviaQAError, match="no Value or Aliases"):
        parse_triviaqa({"Data": [{"Question": "q", "Answer": {"Aliases": []}}]})
    with pytest.raises(TriviaQAError, match="'Data' is empty"):
        parse_triviaqa({"Data": []})
    bad = tmp_path / "bad.json"
    bad.write_text('{"Data": [\n{"Question": }]}')
    with pytest.raises(TriviaQAError, match=r"bad.json:2: not valid JSON"):
        load_triviaqa(bad)
    with pytest.raises(FileNotFoundError):
        load_triviaqa(tmp_path / "missing.json")


def test_limit_and_human_answers(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"Data": [
        {"Question": "q1", "Answer": {"Value": "One", "Aliases": ["1"], "HumanAnswers": ["uno"]}},
        {"Question": "q2", "Answer": {"Value": "Two"}},
    ]}))
    items = load_triviaqa(f, limit=1)
    assert len(items) == 1 and exact_match("Uno", items[0].answers)


def test_stop_ids_and_generation_scoring():
    from sorted_jax.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    assert newline_stop_ids(tok) == [ord("\n") + ByteTokenizer.OFFSET]
    items = parse_triviaqa({"Data": [
        {"Question": "Capital of France?", "Answer": {"Value": "Paris"}},
        {"Question": "2+2?", "Answer": {"Value": "4", "Aliases": ["four"]}},
    ]})
    seen = []

    def gen(prompts):
        seen.extend(prompts)
        return [tok.encode(" Paris.\nQuestion"), tok.encode(" five")]

    out = evaluate_generations(gen, tok, items, batch_size=2)
    assert out["em"] == 0.5
    assert [p["prediction"] for p in out["predictions"]] == ["Paris.", "five"]
    assert seen[0] == [tok.bos_id, *tok.encode("Question: Capital of France?\nAnswer:")]


def test_stop_ids_llama_tokenizer():
    model = ASSETS / "llama2_tokenizer.model"
    if not model.is_file():
        pytest.skip(f"{model} not found")
    from sorted_jax.data.tokenizers import SentencePieceTokenizer

    tok = SentencePieceTokenizer(model)
    ids = newline_stop_ids(tok)
    assert 13 in ids  # <0x0A>
    assert all("\n" in tok.decode([i]) for i in ids)
