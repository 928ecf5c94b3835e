"""Parsers of command-line values the commands share (errors are `UsageError`s)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sorted_jax.core.errors import UsageError


def parse_numbers(values: Sequence[str] | None, cast: Callable[[str], Any], what: str
                  ) -> list | None:
    """Comma- or space-separated numbers from repeated CLI values; None when not given."""
    if values is None:
        return None
    out = []
    for v in values:
        for part in str(v).replace(",", " ").split():
            try:
                out.append(cast(part))
            except ValueError:
                raise UsageError(f"{what}, got {part!r}") from None
    return out
