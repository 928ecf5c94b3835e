"""An OpenAI request body, checked and read as a decoding request: prompt ids (a prompt, token
ids or chat messages), `DecodeOptions` (the standard fields and sorted_jax's own `mode`,
`exit_layer`, `exits`, `thresholds`, `draft_layer`), stop strings and whether to stream.

Every bad field is a `ServeError` naming it (a 400 for the client), raised before the request
reaches the scheduler; this module needs no HTTP framework.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sorted_jax.core.errors import DataError, ServeError, UserError
from sorted_jax.data.chat import chat_prompt_ids, has_chat_template, validate_messages
from sorted_jax.data.tokenizers import bos_prefix
from sorted_jax.decoding import MODES, DecodeOptions

__all__ = ["DEFAULT_MAX_TOKENS", "parse_request"]

DEFAULT_MAX_TOKENS = 16


def _field(body: dict, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ServeError(f"'{name}' must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ServeError(f"'{name}' must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "a list", dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _prompt_ids(body: dict, chat: bool, tokenizer: Any) -> list[int]:
    if chat:
        msgs = _field(body, "messages", list)
        if not msgs:
            raise ServeError("'messages' must be a non-empty list of {role, content}")
        try:  # the same checks as chat training data: roles, string contents
            clean = validate_messages({"messages": msgs}, "'messages'", for_training=False)
        except DataError as e:
            raise ServeError(str(e)) from None
        if has_chat_template(tokenizer):
            return chat_prompt_ids(tokenizer, clean)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in clean) + "assistant:"
        return bos_prefix(tokenizer) + tokenizer.encode(text)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ServeError("'prompt' is empty")
        return bos_prefix(tokenizer) + tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise ServeError("'prompt' must be a string or a list of token ids (one prompt: n and "
                     "batched prompts are not supported)")


def parse_request(body: Any, chat: bool, tokenizer: Any, config: Any,
                  default_exits: Sequence[int] | None = None
                  ) -> tuple[list[int], DecodeOptions, list[str], bool]:
    """(prompt ids, decode options, stop strings, stream) of an OpenAI request body; a
    `ServeError` (400) names the bad field. `default_exits`: the checkpoint's trained exits,
    early exit's exits and speculative decoding's draft when the request names none."""
    if not isinstance(body, dict):
        raise ServeError("the request body must be a JSON object")
    if _field(body, "n", int, 1) != 1:
        raise ServeError("'n' must be 1 (one choice per request)")
    ids = _prompt_ids(body, chat, tokenizer)
    if any(not 0 <= t < config.vocab_size for t in ids):
        raise ServeError(f"prompt token ids must be in [0, {config.vocab_size})")
    ctx = config.max_position_embeddings
    if len(ids) >= ctx:
        raise ServeError(f"the prompt has {len(ids)} tokens; the model's context is {ctx}")
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _field(body, key, int, min(DEFAULT_MAX_TOKENS, ctx - len(ids)))
    if max_tokens < 1:
        raise ServeError(f"'{key}' must be >= 1, got {max_tokens}")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ServeError("'stop' must be a string or a list of at most 4 strings")
    temperature = float(_field(body, "temperature", (int, float), 1.0))
    if not 0 <= temperature <= 2:
        raise ServeError(f"'temperature' must be in [0, 2], got {temperature}")
    mode = _field(body, "mode", str)
    if mode is None:
        mode = ("speculative" if body.get("draft_layer") is not None else "early-exit"
                if body.get("thresholds") is not None or body.get("exits") is not None
                else "fixed")
    if mode not in MODES:
        raise ServeError(f"'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    thresholds = _field(body, "thresholds", list)
    if thresholds is not None and not all(
            isinstance(t, int | float) and not isinstance(t, bool) for t in thresholds):
        raise ServeError(f"'thresholds' must be a list of numbers, got {thresholds!r}")
    if thresholds is not None and not all(0 <= t <= 1 for t in thresholds):
        raise ServeError(f"'thresholds' must lie in [0, 1], got {thresholds!r}")
    try:
        opts = DecodeOptions(
            mode=mode, exit_layer=_field(body, "exit_layer", int),
            exits=_field(body, "exits", list), thresholds=thresholds,
            draft_layer=_field(body, "draft_layer", int), max_new_tokens=max_tokens,
            temperature=temperature, top_p=float(_field(body, "top_p", (int, float), 1.0)),
            seed=_field(body, "seed", int, 0))
        opts = opts.with_trained_exits(default_exits, config.num_hidden_layers)
        opts.route(config)
    except ServeError:
        raise
    except UserError as e:
        raise ServeError(str(e)) from None
    if len(ids) + max_tokens > ctx:
        raise ServeError(f"prompt of {len(ids)} tokens + {key}={max_tokens} exceeds the "
                         f"model's context of {ctx}")
    return ids, opts, stop, bool(_field(body, "stream", bool, False))
