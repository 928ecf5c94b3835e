"""Decoding for SoFT models: any exit, early exit, self-speculative.

Modules, lowest first: `sampling` (token selection, speculative acceptance), `options`
(`DecodeOptions`, one frozen request, and its `Route`), `results` (typed statistics), `state`
(the traced batch state, and `Stack`: segments of layers, exit adapters included), `programs`
(`Programs`, the hashable value whose jitted methods run a route), `engine`
(`Decoder`: prompts in, tokens and statistics out), `batch_job` (a file of prompt records
decoded to JSON result lines, as `python -m sorted_jax.generate` runs it).
"""

from sorted_jax.decoding.engine import SPEC_COMMITS, BatchRun, Decoder, generate
from sorted_jax.decoding.options import (
    MODES,
    PAPER_THRESHOLDS,
    DecodeOptions,
    Route,
    default_exits,
    default_thresholds,
    stop_ids,
)
from sorted_jax.decoding.programs import Programs
from sorted_jax.decoding.results import (
    DecodeMemory,
    DecodeStats,
    EarlyExitStats,
    FixedStats,
    GenerationResult,
    SpeculativeStats,
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
    "SPEC_COMMITS",
    "BatchRun",
    "DecodeMemory",
    "DecodeOptions",
    "DecodeStats",
    "Decoder",
    "EarlyExitStats",
    "FixedStats",
    "GenerationResult",
    "Route",
    "Programs",
    "SamplingParams",
    "SpeculativeStats",
    "default_exits",
    "default_thresholds",
    "generate",
    "greedy_accept",
    "probs_of",
    "select",
    "speculative_accept",
    "stop_ids",
    "warp_logits",
]
