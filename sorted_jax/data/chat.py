"""Chat data: conversations in the OpenAI ``messages`` and ShareGPT ``conversations`` formats,
rendered and tokenized with the tokenizer's own chat template.

    messages = validate_messages(obj, "data.jsonl:3")       # either format -> [{role, content}]
    ids, mask = encode_chat(tokenizer, messages)             # training: ids + loss mask
    prompt = chat_prompt_ids(tokenizer, messages)            # generation: ids ending in the
                                                             # template's assistant header

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}``
(ShareGPT's ``{"from": "system" | "human" | "gpt", "value": str}`` is read as the same). It
needs at least one assistant turn, and no assistant turn before the first user turn.

**Ids.** Training ids are exactly ``tokenizer.apply_chat_template(messages, tokenize=True)``:
the rendered text tokenized with special tokens parsed and no BOS/EOS added by the tokenizer
(the template writes whatever BOS its model expects).

**Loss mask: the assistant spans, from the template itself.** Where the template marks them
(``{% generation %}`` blocks), the template's own assistant-token mask is used. Otherwise each
assistant turn i is delimited by rendering prefixes: its content starts where
``render(messages[:i], add_generation_prompt=True)`` ends and its turn ends where
``render(messages[:i + 1])`` ends; the tokens that overlap that span are targets (a token
that straddles its start, e.g. a newline merged with the content's leading space, counts, as
in transformers' own assistant mask), except trailing whitespace-only tokens (the newline a
template writes after its end-of-turn token).
So the loss covers every assistant turn's content and its end-of-turn token (SmolLM2:
``<|im_end|>``), and nothing else. A template that does not render conversations
prefix-consistently is refused with a clear error.

The tokenizer is duck-typed: anything with an ``hf`` attribute holding a transformers tokenizer
(`tokenizers.HFTokenizer`). A server can call `chat_prompt_ids` / `render_chat` directly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np

from sorted_jax.core.errors import DataError

__all__ = ["CHAT_FIELDS", "ROLES", "ChatTemplateError", "Message", "chat_prompt_ids",
           "encode_chat", "encode_chats", "has_chat_template", "instruction_messages",
           "is_chat_record", "render_chat", "require_chat_template", "validate_messages"]

ROLES = ("system", "user", "assistant")
# ShareGPT speaker names -> OpenAI roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
# Record fields holding a conversation: OpenAI first, then ShareGPT.
CHAT_FIELDS = ("messages", "conversations")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(DataError):
    """A tokenizer without a chat template, or a template that cannot give assistant spans."""


class Message(TypedDict):
    role: str
    content: str


# ---------------------------------------------------------------------------------------------
# conversations


def is_chat_record(obj: Any) -> bool:
    """Whether a raw record holds a conversation (``messages`` or ``conversations``)."""
    return isinstance(obj, Mapping) and any(k in obj for k in CHAT_FIELDS)


def validate_messages(obj: Mapping[str, Any], where: str, for_training: bool = True
                      ) -> list[Message]:
    """The conversation of a raw chat record as ``[{role, content}]``, checked.

    ``obj["messages"]`` is OpenAI's format (``role``/``content``), ``obj["conversations"]``
    ShareGPT's (``from``/``value``). Raises `DataError` starting with ``where`` for an empty
    conversation, an unknown role, a non-string content and, `for_training`, no assistant turn
    or an assistant turn before any user turn (a prompt to generate from needs neither).
    """
    field = next(k for k in CHAT_FIELDS if k in obj)
    sharegpt = field == "conversations"
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    known = SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
    turns = obj[field]
    if not isinstance(turns, Sequence) or isinstance(turns, str | bytes):
        raise DataError(f"{where}: {field!r} is a {type(turns).__name__}, expected a list of "
                        "messages")
    if not turns:
        raise DataError(f"{where}: empty conversation ({field!r} has no messages)")
    out: list[Message] = []
    for j, m in enumerate(turns):
        at = f"{where}: message {j}"
        if not isinstance(m, Mapping):
            raise DataError(f"{at} is a {type(m).__name__}, expected an object with "
                            f"{role_key!r} and {content_key!r}")
        if role_key not in m:
            raise DataError(f"{at} has no {role_key!r} field (keys: {sorted(m)})")
        role = m[role_key]
        if not isinstance(role, str) or role not in known:
            raise DataError(f"{at}: unknown role {role!r} (expected one of "
                            f"{', '.join(known)})")
        if content_key not in m:
            raise DataError(f"{at} has no {content_key!r} field (keys: {sorted(m)})")
        content = m[content_key]
        if not isinstance(content, str):
            raise DataError(f"{at}: {content_key!r} is a {type(content).__name__}, expected a "
                            "string")
        out.append(Message(role=known[role], content=content))
    roles = [m["role"] for m in out]
    if not for_training:
        return out
    if "assistant" not in roles:
        raise DataError(f"{where}: no assistant turn (roles: {', '.join(roles)}): nothing to "
                        "train on")
    first_user = roles.index("user") if "user" in roles else len(roles)
    if roles.index("assistant") < first_user:
        raise DataError(f"{where}: message {roles.index('assistant')} is an assistant turn "
                        "before any user turn")
    return out


def instruction_messages(instruction: str, input: str = "", output: str | None = None,
                         system: str | None = None) -> list[Message]:
    """An instruction record as a conversation: instruction (+ a blank line + input) is the
    user turn, output (if given) the assistant turn; `system` first if given."""
    user = instruction if not input else f"{instruction}\n\n{input}"
    msgs = [Message(role="system", content=system)] if system is not None else []
    msgs.append(Message(role="user", content=user))
    if output is not None:
        msgs.append(Message(role="assistant", content=output))
    return msgs


# ---------------------------------------------------------------------------------------------
# the tokenizer's template


def _hf(tokenizer: Any) -> Any:
    return getattr(tokenizer, "hf", None)


def has_chat_template(tokenizer: Any) -> bool:
    hf = _hf(tokenizer)
    return hf is not None and bool(getattr(hf, "chat_template", None))


def require_chat_template(tokenizer: Any) -> Any:
    """The transformers tokenizer behind `tokenizer`, which must have a chat template."""
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "spec", None) or repr(tokenizer)
        raise ChatTemplateError(
            f"template 'chat' needs a tokenizer with a chat template, but the tokenizer "
            f"{str(name)!r} has none (a Hugging Face tokenizer dir with a chat_template in "
            "tokenizer_config.json or a chat_template.jinja file); use template alpaca / plain, "
            "or a chat model's tokenizer dir")
    return _hf(tokenizer)


def _has_generation_markers(hf: Any) -> bool:
    template = hf.chat_template
    texts = template.values() if isinstance(template, Mapping) else [template]
    return any(_GENERATION_TAG.search(t) for t in texts)


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]],
                add_generation_prompt: bool = False) -> str:
    """The text the tokenizer's chat template renders for `messages`."""
    hf = require_chat_template(tokenizer)
    return hf.apply_chat_template(list(messages), tokenize=False,
                                  add_generation_prompt=add_generation_prompt)


def _tokenize(hf: Any, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Ids (as `apply_chat_template(tokenize=True)` makes them: special tokens parsed, none
    added) and character offsets of `texts`."""
    enc = hf(texts, add_special_tokens=False, return_offsets_mapping=True)
    return ([list(x) for x in enc["input_ids"]],
            [[tuple(o) for o in offs] for offs in enc["offset_mapping"]])


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Ids of `messages` followed by the template's assistant header: a generation prompt."""
    hf = require_chat_template(tokenizer)
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return _tokenize(hf, [text])[0][0]


def _span_mask(text: str, offsets: list[tuple[int, int]],
               spans: list[tuple[int, int]]) -> np.ndarray:
    """True for tokens that overlap a span (as transformers' own assistant mask), trailing
    whitespace-only tokens left out."""
    starts = np.asarray([s for s, _ in offsets], np.int64)
    ends = np.asarray([e for _, e in offsets], np.int64)
    mask = np.zeros(len(offsets), bool)
    for a, b in spans:
        inside = np.flatnonzero((ends > a) & (starts < b))
        while len(inside) and not text[offsets[inside[-1]][0]:offsets[inside[-1]][1]].strip():
            inside = inside[:-1]
        mask[inside] = True
    return mask


def encode_chats(tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, str]]],
                 first_index: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`encode_chat` of many conversations (rendered and tokenized in batches).

    Errors name conversation ``first_index + k``.
    """
    hf = require_chat_template(tokenizer)
    convs = [list(c) for c in conversations]
    if not convs:
        return []
    if _has_generation_markers(hf):
        out = hf.apply_chat_template(convs, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        return [(np.asarray(ids, np.int32), np.asarray(m, bool))
                for ids, m in zip(out["input_ids"], out["assistant_masks"], strict=True)]
    texts = hf.apply_chat_template(convs, tokenize=False)
    # Prefixes: before each assistant turn's content, and through its end.
    before, through, owner = [], [], []
    for k, conv in enumerate(convs):
        for i, m in enumerate(conv):
            if m["role"] == "assistant":
                before.append(conv[:i])
                through.append(conv[:i + 1])
                owner.append(k)
    if not owner:
        raise ChatTemplateError(f"conversations {first_index}..{first_index + len(convs) - 1} "
                                "have no assistant turn: nothing to train on")
    r_before = hf.apply_chat_template(before, tokenize=False, add_generation_prompt=True)
    r_through = hf.apply_chat_template(through, tokenize=False)
    spans: list[list[tuple[int, int]]] = [[] for _ in convs]
    for k, pb, pt in zip(owner, r_before, r_through, strict=True):
        full = texts[k]
        if not (pt.startswith(pb) and full.startswith(pt)):
            raise ChatTemplateError(
                f"conversation {first_index + k}: the chat template does not render it "
                "prefix-consistently (an assistant turn's prompt or text differs between the "
                "whole conversation and its prefix), so its assistant spans cannot be "
                "derived; use a template with {% generation %} markers")
        spans[k].append((len(pb), len(pt)))
    ids, offsets = _tokenize(hf, list(texts))
    return [(np.asarray(i, np.int32), _span_mask(t, o, s))
            for i, o, s, t in zip(ids, offsets, spans, texts, strict=True)]


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]]
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [n], loss_mask bool [n])`` of one conversation: ids exactly as
    ``apply_chat_template(messages, tokenize=True)``; mask true on the assistant turns'
    content and end-of-turn tokens (see the module docstring)."""
    return encode_chats(tokenizer, [messages])[0]
