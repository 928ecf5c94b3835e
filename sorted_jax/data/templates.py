"""Prompt templates: turn an instruction record into (prompt_text, response_text).

The loss is computed on the response only, so every template returns the two parts separately.
The "alpaca" template is the Stanford Alpaca one, verbatim (the paper fine-tunes with it).
"chat" is the tokenizer's own chat template (`sorted_jax.data.chat`), for chat records and for
instruction records (one user turn, one assistant turn). `prompt_ids` is what generation feeds
the model for a record under any template, BOS as the tokenizer wants it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sorted_jax.core.errors import DataError
from sorted_jax.data.chat import (
    chat_prompt_ids,
    instruction_messages,
    is_chat_record,
    validate_messages,
)
from sorted_jax.data.tokenizers import Tokenizer, bos_prefix

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
CHAT = "chat"
# Every training template: the text templates above and the tokenizer's chat template.
TEMPLATE_NAMES = (*TEMPLATES, CHAT)
# At generation time, "none" feeds the prompt text as it is.
PROMPT_TEMPLATES = (*TEMPLATE_NAMES, "none")


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


def prompt_ids(tokenizer: Tokenizer, record: Mapping[str, Any], template: str,
               system: str | None = None) -> list[int]:
    """The ids a model is prompted with for `record` (``{"prompt"}``, ``{"instruction"[,
    "input"]}`` or, with the chat template, ``{"messages"}``) under `template`, as training
    saw its prompts: BOS as the tokenizer wants it for text templates (``none`` = the text as
    it is); the chat template's rendering up to its assistant header for ``chat``, with
    `system` as a system turn (only for ``chat``)."""
    if system is not None and template != CHAT:
        raise DataError(f"a system prompt needs the chat template, not {template!r}")
    if template == CHAT:
        if is_chat_record(record):
            msgs = validate_messages(record, "prompt record", for_training=False)
        else:
            msgs = instruction_messages(_instruction(record), record.get("input", ""))
        if system is not None:
            msgs = [{"role": "system", "content": system},
                    *[m for m in msgs if m["role"] != "system"]]
        return chat_prompt_ids(tokenizer, msgs)
    if is_chat_record(record):
        raise DataError(f"a conversation (messages) needs the chat template, not {template!r}")
    instruction = _instruction(record)
    if template == "none":
        extra = record.get("input", "")
        text = instruction if not extra else f"{instruction}\n{extra}"
    else:
        text = format_prompt(instruction, record.get("input", ""), template)
    return [*bos_prefix(tokenizer), *tokenizer.encode(text)]


def _instruction(record: Mapping[str, Any]) -> str:
    text = record.get("instruction", record.get("prompt"))
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"empty prompt in record {dict(record)!r}")
    return text
