"""What to decode: one frozen `DecodeOptions` per request, checked when it is made, and its
`Route` for a model (which segments of layers run, with which early-exit thresholds).

    opts = DecodeOptions(mode="early-exit", exits=(4, 8), max_new_tokens=64)
    route = opts.route(config)        # checks the layers against the model

Options are hashable values: a server can key batches or programs on them, and `replace`
derives a request from another.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sorted_jax.core.errors import DecodeError
from sorted_jax.model.config import LlamaConfig
from sorted_jax.objective.soft import default_exits  # the exit set SoFT trains by default

MODES = ("fixed", "early-exit", "speculative")
# Paper (Sorted LLaMA, Sec. 4.4): thresholds of the first seven exits; the last always accepts.
PAPER_THRESHOLDS = (0.95, 0.95, 0.9, 0.9, 0.8, 0.8, 0.7)


def stop_ids(config: LlamaConfig, tokenizer_eos: int) -> tuple[int, ...]:
    """Every id that ends a response: the model's EOS ids (one, or a list as Llama-3-Instruct's
    generation_config.json gives) and the tokenizer's EOS, in that order, without repeats."""
    eos = config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return tuple(dict.fromkeys([*(int(i) for i in ids), int(tokenizer_eos)]))


def default_thresholds(num_exits: int) -> tuple[float, ...]:
    """Thresholds of the first num_exits - 1 exits (paper's list, its last value repeated)."""
    t = list(PAPER_THRESHOLDS[: max(num_exits - 1, 0)])
    t += [PAPER_THRESHOLDS[-1]] * (num_exits - 1 - len(t))
    return tuple(t)


def _check_layer(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not (
            lo <= value <= hi):
        raise DecodeError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")


def _tuple(x: Any) -> tuple | None:
    return None if x is None else tuple(x)


@dataclasses.dataclass(frozen=True)
class Route:
    """A segment layout: `ladder` runs segments [a, b) one after the other (fixed depth: one
    segment; early exit: one per exit), `speculative` drafts with [0, k) and verifies with
    [k, L)."""

    kind: str  # "ladder" | "speculative"
    bounds: tuple[tuple[int, int], ...]
    thresholds: tuple[float, ...]  # early exit: one per exit but the last


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """One decoding request's settings.

    mode: ``fixed`` (depth `exit_layer`, default the full model), ``early-exit`` (`exits`,
    default `default_exits(L)`; `thresholds` for all but the last exit, default the paper's),
    ``speculative`` (draft depth `draft_layer`). temperature 0 = greedy; `top_k` 0 and `top_p`
    1 are off. eos_id: id(s) that stop a row, any of them (default the config's eos_token_id,
    one id or a list as generation_config.json may give; () = never).
    max_len: KV cache slots (default: padded prompt + max_new_tokens, rounded up to 64).
    """

    mode: str = "fixed"
    exit_layer: int | None = None
    exits: tuple[int, ...] | None = None
    thresholds: tuple[float, ...] | None = None
    draft_layer: int | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eos_id: int | tuple[int, ...] | None = None
    max_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("exits", "thresholds"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        if self.eos_id is not None and not isinstance(self.eos_id, (int, np.integer)):
            object.__setattr__(self, "eos_id", tuple(int(e) for e in self.eos_id))
        if self.mode not in MODES:
            raise DecodeError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        n = self.max_new_tokens
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise DecodeError(f"max_new_tokens must be a positive integer, got {n!r}")
        if not self.temperature >= 0:
            raise DecodeError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DecodeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise DecodeError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    def replace(self, **changes: Any) -> DecodeOptions:
        return dataclasses.replace(self, **changes)

    def with_trained_exits(self, exits: Sequence[int] | None, num_layers: int
                           ) -> DecodeOptions:
        """These options with a checkpoint's trained `exits` (`Artifact.default_exits`) where
        they were left unset: early exit's exits, and speculative decoding's draft (the first
        trained exit below the last layer). Every decoding command uses this, so `generate`,
        `serve` and `evaluate` default to the same layers."""
        if not exits:
            return self
        if self.mode == "early-exit" and self.exits is None:
            return self.replace(exits=tuple(int(e) for e in exits))
        below = [int(e) for e in exits if e < num_layers]
        if self.mode == "speculative" and self.draft_layer is None and below:
            return self.replace(draft_layer=below[0])
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def eos_ids(self, config: LlamaConfig) -> list[int]:
        eos = config.eos_token_id if self.eos_id is None else self.eos_id
        if eos is None:
            return []
        return [int(eos)] if isinstance(eos, (int, np.integer)) else [int(e) for e in eos]

    def route(self, config: LlamaConfig) -> Route:
        """The segment layout of this request on `config`'s model (its layers checked)."""
        big_l = config.num_hidden_layers
        if self.mode == "fixed":
            k = big_l if self.exit_layer is None else self.exit_layer
            _check_layer("exit_layer", k, 1, big_l)
            return Route("ladder", ((0, k),), ())
        if self.mode == "early-exit":
            return self._early_exit_route(big_l)
        if big_l < 2:
            raise DecodeError("speculative decoding needs a model with at least 2 layers")
        k = default_exits(big_l)[0] if self.draft_layer is None else self.draft_layer
        if k >= big_l:
            k = big_l // 2 if self.draft_layer is None else k
        _check_layer("draft_layer", k, 1, big_l - 1)
        return Route("speculative", ((0, k), (k, big_l)), ())

    def _early_exit_route(self, big_l: int) -> Route:
        ex = tuple(default_exits(big_l) if self.exits is None else self.exits)
        if not ex:
            raise DecodeError("early-exit needs at least one exit layer")
        for e in ex:
            _check_layer("exit", e, 1, big_l)
        if any(b <= a for a, b in zip(ex, ex[1:], strict=False)):
            raise DecodeError(f"exits must be strictly increasing, got {list(ex)}")
        th: Sequence[float] = (default_thresholds(len(ex)) if self.thresholds is None
                               else self.thresholds)
        if len(th) == len(ex):
            th = th[:-1]  # the last exit always accepts
        if len(th) != len(ex) - 1:
            raise DecodeError(f"{len(ex)} exits need {len(ex) - 1} thresholds (the last exit "
                              f"always accepts), got {len(th)}")
        th = tuple(float(t) for t in th)
        if any(math.isnan(t) for t in th):
            raise DecodeError("thresholds must be numbers, got NaN")
        return Route("ladder", tuple(zip((0, *ex[:-1]), ex, strict=True)), th)
