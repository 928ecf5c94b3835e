"""A `LlamaConfig` from a GGUF file's metadata (llama.cpp's `llama.*` and `tokenizer.ggml.*`
keys), checked: only what sorted_jax's LLaMA can run is accepted, and anything else is refused
by name.

    general.architecture                "llama" (Mistral, Llama 2/3, SmolLM2, TinyLlama, ...)
    llama.block_count                   num_hidden_layers
    llama.embedding_length              hidden_size
    llama.feed_forward_length           intermediate_size
    llama.attention.head_count(_kv)     num_attention_heads, num_key_value_heads
    llama.attention.key_length          head_dim (when not hidden_size / heads)
    llama.attention.layer_norm_rms_epsilon, llama.rope.freq_base, llama.context_length
    llama.rope.scaling.type / .factor   "linear" rope scaling
    rope_freqs.weight (a tensor)        Llama 3.1 / 3.2 ("llama3") rope scaling
    tokenizer.ggml.{bos,eos,eot,eom,padding}_token_id    special ids (EOS: all three, as
                                        llama.cpp stops on each)

The vocab size is the embedding's row count; the embeddings are tied when there is no
`output.weight`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sorted_jax.core.errors import ConversionError
from sorted_jax.model.config import ConfigError, LlamaConfig, rope_inv_freq

ARCH = "llama"
# (low_freq_factor, high_freq_factor, original_max_position_embeddings) of the llama3 rope
# scalings in use (Llama 3.1: factor 8, Llama 3.2: factor 32); the factor is read off the file.
_LLAMA3_SHAPES = ((1.0, 4.0, 8192),)


def _int(meta: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise ConversionError(f"{path} has no {key} in its GGUF metadata; it is not a complete "
                              "LLaMA GGUF")
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConversionError(f"{path}: GGUF metadata {key} must be an integer, got {value!r}")
    return int(value)


def _float(meta: dict[str, Any], key: str, default: float) -> float:
    return float(meta.get(key, default))


def _eos_ids(meta: dict[str, Any]) -> int | list[int] | None:
    ids: list[int] = []
    for key in ("eos", "eot", "eom"):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return None if not ids else ids[0] if len(ids) == 1 else ids


def _llama3_scaling(factors: np.ndarray, head_dim: int, theta: float, path: Path
                    ) -> dict[str, Any] | None:
    """The llama3 rope_scaling whose per-frequency divisors are `factors` (llama.cpp's
    `rope_freqs.weight`), or None when they are all 1."""
    if factors.shape != (head_dim // 2,):
        raise ConversionError(f"{path}: rope_freqs.weight has shape {factors.shape}, expected "
                              f"({head_dim // 2},) for head_dim {head_dim}")
    if np.allclose(factors, 1.0):
        return None
    base = LlamaConfig(vocab_size=1, hidden_size=head_dim, intermediate_size=1,
                       num_hidden_layers=1, num_attention_heads=1, rope_theta=theta)
    plain = np.asarray(rope_inv_freq(base))
    for low, high, orig in _LLAMA3_SHAPES:
        scaling = {"rope_type": "llama3", "factor": float(np.max(factors)),
                   "low_freq_factor": low, "high_freq_factor": high,
                   "original_max_position_embeddings": orig}
        scaled = np.asarray(rope_inv_freq(base.replace(rope_scaling=scaling)))
        if np.allclose(plain / scaled, factors, rtol=1e-4):
            return scaling
    raise ConversionError(f"{path}: its rope_freqs.weight (per-frequency rope factors "
                          f"{np.round(factors[:4], 3).tolist()}...) is not a llama3 rope scaling "
                          "sorted_jax knows how to rebuild")


def _rope_scaling(meta: dict[str, Any], factors: np.ndarray | None, head_dim: int,
                  theta: float, path: Path) -> dict[str, Any] | None:
    kind = meta.get(f"{ARCH}.rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"rope_type": "linear",
                   "factor": _float(meta, f"{ARCH}.rope.scaling.factor", 1.0)}
    elif kind == "none":
        scaling = None
    else:
        raise ConversionError(f"{path} uses rope scaling {kind!r} ({ARCH}.rope.scaling.type); "
                              "sorted_jax supports none, linear and llama3")
    if factors is not None:
        if scaling is not None:
            raise ConversionError(f"{path} has both {kind} rope scaling and rope_freqs.weight")
        scaling = _llama3_scaling(factors, head_dim, theta, path)
    return scaling


def check_architecture(meta: dict[str, Any], path: Path) -> None:
    """Refuse, before its tensors are looked at, a GGUF of a model sorted_jax cannot run."""
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ConversionError(f"{path} is a GGUF of a {arch!r} model (general.architecture); "
                              f"sorted_jax reads LLaMA-architecture GGUFs ({ARCH!r}) only")
    split = meta.get("split.count")
    if split is not None and int(split) > 1:
        raise ConversionError(f"{path} is part of a GGUF split into {int(split)} files; merge "
                              "them first with llama.cpp's `llama-gguf-split --merge`")
    if meta.get(f"{ARCH}.expert_count"):
        raise ConversionError(f"{path} is a mixture-of-experts model ({ARCH}.expert_count="
                              f"{meta[f'{ARCH}.expert_count']}); sorted_jax runs dense LLaMA "
                              "models only")


def config_from_metadata(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                         rope_factors: np.ndarray | None, path: Path) -> LlamaConfig:
    """The model config of a GGUF file: `meta` its metadata, `shapes` its tensors' shapes by
    HF name, `rope_factors` its rope_freqs.weight (or None)."""
    check_architecture(meta, path)
    heads = _int(meta, f"{ARCH}.attention.head_count", path)
    kv = meta.get(f"{ARCH}.attention.head_count_kv", heads)
    if isinstance(kv, list):
        raise ConversionError(f"{path} has a per-layer head_count_kv; sorted_jax needs one kv "
                              "head count for all layers")
    hidden = _int(meta, f"{ARCH}.embedding_length", path)
    head_dim = _int(meta, f"{ARCH}.attention.key_length", path, hidden // max(heads, 1))
    value_dim = _int(meta, f"{ARCH}.attention.value_length", path, head_dim)
    rope_dim = _int(meta, f"{ARCH}.rope.dimension_count", path, head_dim)
    if value_dim != head_dim or rope_dim != head_dim:
        raise ConversionError(f"{path}: key_length {head_dim}, value_length {value_dim} and "
                              f"rope.dimension_count {rope_dim} differ; sorted_jax's LLaMA "
                              "needs one head_dim with rotary embeddings over all of it")
    embed = shapes.get("model.embed_tokens.weight")
    if embed is None or len(embed) != 2:
        raise ConversionError(f"{path} has no 2-D token_embd.weight tensor")
    theta = _float(meta, f"{ARCH}.rope.freq_base", 10000.0)
    pad = meta.get("tokenizer.ggml.padding_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    try:
        return LlamaConfig(
            vocab_size=int(embed[0]), hidden_size=hidden,
            intermediate_size=_int(meta, f"{ARCH}.feed_forward_length", path),
            num_hidden_layers=_int(meta, f"{ARCH}.block_count", path),
            num_attention_heads=heads, num_key_value_heads=int(kv),
            head_dim=None if head_dim * heads == hidden else head_dim,
            rms_norm_eps=_float(meta, f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=theta,
            rope_scaling=_rope_scaling(meta, rope_factors, head_dim, theta, path),
            max_position_embeddings=_int(meta, f"{ARCH}.context_length", path, 4096),
            tie_word_embeddings="lm_head.weight" not in shapes,
            bos_token_id=None if bos is None else int(bos), eos_token_id=_eos_ids(meta),
            pad_token_id=None if pad is None else int(pad))
    except ConfigError as e:
        raise ConversionError(f"{path}: its GGUF metadata is not a usable LLaMA config: "
                              f"{e}") from None
