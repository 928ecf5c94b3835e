"""LLaMA architecture config, read from and written to Hugging Face `config.json` dicts.

One dataclass covers LLaMA 1, 2, 3 and 3.1: they differ only in values (vocab, kv heads,
rope_theta) and in 3.1's "llama3" rope scaling. Invalid shapes fail here, at construction,
so nothing downstream has to re-check them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from sorted_jax.core.errors import UserError


class ConfigError(UserError):
    """A model config value that cannot describe a LLaMA model."""


ROPE_TYPES = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # Exits with their own adapter layer on a frozen trunk (`exit_adapters`); () = none.
    exit_adapters: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "exit_adapters", tuple(int(e) for e in self.exit_adapters))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        self.validate()

    # -- derived -----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def kv_heads(self) -> int:
        assert self.num_key_value_heads is not None
        return self.num_key_value_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else (
            self.hidden_size // self.num_attention_heads)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} does not divide "
                f"hidden_size={self.hidden_size}; set head_dim explicitly or fix the head count")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ConfigError(f"head_dim must be positive, got {self.head_dim}")
        if self.dim_per_head % 2:
            raise ConfigError(f"rotary embeddings need an even head_dim, got {self.dim_per_head}")
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(
                f"num_key_value_heads={self.kv_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}")
        if not (self.rms_norm_eps > 0):
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not (self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"unknown rope_scaling type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.rope_type == "llama3":
            need = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")
            missing = [k for k in need if k not in self.rope_scaling]
            if missing:
                raise ConfigError(f"llama3 rope_scaling is missing {missing}")
        if self.rope_type == "linear" and "factor" not in self.rope_scaling:
            raise ConfigError("linear rope_scaling needs a 'factor'")
        a = self.exit_adapters
        if any(not 1 <= e < self.num_hidden_layers for e in a) or any(
                x >= y for x, y in zip(a, a[1:], strict=False)):
            raise ConfigError(f"exit_adapters must be increasing exits in 1.."
                              f"{self.num_hidden_layers - 1}, got {list(a)}")

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def submodel(self, depth: int) -> LlamaConfig:
        """The config of the sub-model made of the first `depth` layers."""
        if not 1 <= depth <= self.num_hidden_layers:
            raise ConfigError(
                f"sub-model depth must be in 1..{self.num_hidden_layers}, got {depth}")
        return self.replace(num_hidden_layers=depth, exit_adapters=())

    def layers_config(self, count: int) -> LlamaConfig:
        """A config with `count` layers and no adapters: the shape of a run of layers (a KV
        cache of a decoding segment), not a model."""
        return self.replace(num_hidden_layers=count, exit_adapters=())

    # -- HF config.json ----------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from an HF `config.json` dict; unknown keys (dtype, architectures...) ignored."""
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"expected an HF config with model_type 'llama', got {model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        rope = d.get("rope_parameters")  # transformers 5.x folds theta + scaling into this
        if rope:
            rope = dict(rope)
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope.pop("rope_theta")
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            kwargs["rope_scaling"] = None if rope_type == "default" else rope
        if d.get("head_dim") is not None and "hidden_size" in d and "num_attention_heads" in d:
            if d["head_dim"] * d["num_attention_heads"] == d["hidden_size"]:
                kwargs["head_dim"] = None  # the default; keeps configs canonical
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ConfigError("attention_bias / mlp_bias LLaMA variants are not supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act must be 'silu' for LLaMA, got {act!r}")
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF `config.json` dict that `transformers.LlamaConfig` reads as this model."""
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        for f in dataclasses.fields(self):
            d[f.name] = copy.deepcopy(getattr(self, f.name))
        d["exit_adapters"] = list(self.exit_adapters)
        if not self.exit_adapters:  # a plain LLaMA config: nothing HF does not know
            del d["exit_adapters"]
        d["head_dim"] = self.dim_per_head
        d["rope_parameters"] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                                **(self.rope_scaling or {})}
        return d

    @classmethod
    def from_json_file(cls, path: str | Path) -> LlamaConfig:
        return cls.from_hf_dict(json.loads(Path(path).read_text()))

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    # -- sizes -------------------------------------------------------------------------------
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.dim_per_head
        kv = self.kv_heads * self.dim_per_head
        layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_hidden_layers * layer + d + head


_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(),
    "llama2-13b": LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40),
    "llama3-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
        max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
    "llama3.1-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009]),
    "tinyllama-1.1b": LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=2048),
    # HuggingFaceTB/SmolLM2-135M(-Instruct): a real pretrained LLaMA a CPU can fine-tune.
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2),
    # A model a 2-core CPU trains in minutes; the vocab fits the built-in tokenizer.
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}


def preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None


def rope_inv_freq(config: LlamaConfig) -> list[float]:
    """Rotary inverse frequencies as HF computes them, including llama3 and linear scaling.

    Plain Python floats in float64, so the result does not depend on the JAX x64 flag.
    """
    dim = config.dim_per_head
    inv = [1.0 / (config.rope_theta ** (i / dim)) for i in range(0, dim, 2)]
    if config.rope_type == "linear":
        factor = float(config.rope_scaling["factor"])
        return [f / factor for f in inv]
    if config.rope_type != "llama3":
        return inv
    s = config.rope_scaling
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(
        s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out
