"""Prompt templates: turn an instruction record into (prompt_text, response_text).

The loss is computed on the response only, so every template returns the two parts separately.
The "alpaca" template is the Stanford Alpaca one, verbatim (the paper fine-tunes with it).
"""

from __future__ import annotations

from collections.abc import Mapping

from sorted_jax.errors import DataError

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# A short template for tiny models: the instruction, the input if any, then the response.
PLAIN_PROMPT_WITH_INPUT = "{instruction}\n{input}\n"
PLAIN_PROMPT_NO_INPUT = "{instruction}\n"

TEMPLATES: dict[str, tuple[str, str]] = {
    "alpaca": (ALPACA_PROMPT_WITH_INPUT, ALPACA_PROMPT_NO_INPUT),
    "plain": (PLAIN_PROMPT_WITH_INPUT, PLAIN_PROMPT_NO_INPUT),
}


def format_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    """The prompt text a model sees before its response (also used at generation time).

    As in Stanford Alpaca, the with-input variant is used iff ``input != ""``.
    """
    try:
        with_input, no_input = TEMPLATES[template]
    except KeyError:
        known = sorted(TEMPLATES)
        raise DataError(f"unknown template {template!r}; choose one of {known}") from None
    if input != "":
        return with_input.format(instruction=instruction, input=input)
    return no_input.format(instruction=instruction)


def format_example(record: Mapping[str, str], template: str = "alpaca") -> tuple[str, str]:
    """(prompt_text, response_text) for a record with ``instruction``, ``input``, ``output``."""
    prompt = format_prompt(record["instruction"], record.get("input", ""), template)
    return prompt, record["output"]
