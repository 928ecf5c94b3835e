"""Prompt templates on real Alpaca records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sorted_jax.data.templates import format_example, format_prompt

ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets"


def _asset(name: str) -> Path:
    path = ASSETS / name
    if not path.is_file():
        pytest.skip(f"asset {name} not found at {path}")
    return path


def test_alpaca_template_with_input_is_verbatim():
    rec = json.loads(_asset("alpaca_fixture_2.json").read_text())[0]
    assert rec["input"]
    prompt, response = format_example(rec)
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nYou will be given a series of words. Output these words in reverse "
        "order, with each word on its own line.\n\n"
        "### Input:\nWords: ['Hello', 'world'].\n\n"
        "### Response:\n"
    )
    assert response == "['world', 'Hello']"


def test_alpaca_template_without_input_is_verbatim():
    rec = json.loads(_asset("alpaca_en_demo.json").read_text())[0]
    assert rec["input"] == ""
    prompt, response = format_example(rec)
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nDescribe a process of making crepes.\n\n"
        "### Response:\n"
    )
    assert response == rec["output"]


def test_alpaca_template_on_all_demo_records():
    records = json.loads(_asset("alpaca_en_demo.json").read_text())
    with_input = 0
    for rec in records:
        prompt, response = format_example(rec)
        assert response == rec["output"]
        assert prompt.endswith("\n\n### Response:\n")
        assert f"### Instruction:\n{rec['instruction']}\n\n" in prompt
        if rec["input"]:
            with_input += 1
            assert prompt.startswith("Below is an instruction that describes a task, paired with")
            assert f"### Input:\n{rec['input']}\n\n### Response:\n" in prompt
        else:
            assert "### Input:" not in prompt
    assert with_input == sum(1 for r in records if r["input"] != "") > 0


def test_plain_template_and_missing_input_field():
    assert format_prompt("Reverse the word.", "abc", "plain") == "Reverse the word.\nabc\n"
    assert format_example({"instruction": "Add: 1 + 2", "output": "3"}, "plain") == (
        "Add: 1 + 2\n",
        "3",
    )


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown template"):
        format_prompt("x", template="vicuna")
