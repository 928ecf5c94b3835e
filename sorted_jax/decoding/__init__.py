"""Decoding for SoFT models: any exit, early exit, self-speculative (see `engine`)."""

from sorted_jax.decoding.engine import (
    MODES,
    PAPER_THRESHOLDS,
    Decoder,
    GenerationResult,
    default_exits,
    default_thresholds,
    generate,
)
from sorted_jax.decoding.sampling import (
    SamplingParams,
    greedy_accept,
    probs_of,
    select,
    speculative_accept,
    warp_logits,
)

__all__ = [
    "MODES",
    "PAPER_THRESHOLDS",
    "Decoder",
    "GenerationResult",
    "SamplingParams",
    "default_exits",
    "default_thresholds",
    "generate",
    "greedy_accept",
    "probs_of",
    "select",
    "speculative_accept",
    "warp_logits",
]
