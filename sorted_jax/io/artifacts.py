"""What a path holds: a model dir, a training workdir, an SFT+ICT dir, an HF LLaMA dir or a GGUF
file, read the same way by every command that takes a checkpoint (`evaluate`, `ict`,
`generate`, `serve`, `convert`).

    art = artifacts.inspect("runs/soft_7b")   # validated; config and settings read, no weights
    art.kind, art.config, art.settings, art.head_exits
    params = art.load_params(step=None, dtype="bfloat16")
    tok = art.tokenizer()                     # its own files, else the recorded builtin one

Kinds (the layouts themselves are `model_io`'s and `heads`'):

    model dir    config.json + params/ (+ tokenizer files)        `convert hf-to-orbax`
    workdir      config.json + checkpoints/<step>/ + tokenizer/   `train`
    ICT dir      a model dir + ict_heads/ + ict.json               `ict`
    HF dir       config.json + *.safetensors | *.bin + tokenizer   transformers' save_pretrained
    GGUF file    one .gguf file (weights, config, tokenizer)      llama.cpp, Ollama, LM Studio

HF dirs and GGUF files are read in place, nothing written beside them (`model_io.model_kind`
tells the kinds apart; `hf_checkpoint` and `gguf_file` read the last two).

`settings` is what the run recorded (`run_settings.RunSettings`): the training config of a
workdir, `ict.json` of an ICT dir, nothing for a converted model dir, an HF dir or a GGUF.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sorted_jax.core.errors import ModelIOError
from sorted_jax.data import Tokenizer, load_tokenizer
from sorted_jax.io import ict_dir, model_io
from sorted_jax.io.run_settings import RunSettings, read_run_settings
from sorted_jax.model.config import LlamaConfig
from sorted_jax.objective import heads, soft

MODEL_DIR, WORKDIR, HF_DIR, GGUF_FILE = (model_io.MODEL_DIR, model_io.WORKDIR, model_io.HF_DIR,
                                        model_io.GGUF_FILE)


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A checkpoint path, validated: its kind, model config, recorded settings, ICT heads."""

    path: Path
    kind: str  # MODEL_DIR, WORKDIR, HF_DIR or GGUF_FILE
    config: LlamaConfig
    settings: RunSettings
    head_exits: tuple[int, ...] | None  # exits with an SFT+ICT head; None for a plain model
    tokenizer_dir: Path | None  # the dir holding its tokenizer files (a GGUF: the file), if any
    what: str = "checkpoint"  # how errors name it, e.g. "checkpoint 'sft'"

    @property
    def is_ict(self) -> bool:
        return self.head_exits is not None

    def load_params(self, step: int | None = None, dtype: Any = None,
                    shardings: Any = None) -> dict:
        """The weights (a workdir's latest step unless `step`), checked against the config."""
        params, config, _ = model_io.load_params(self.path, step, dtype, shardings)
        if config != self.config:
            raise ModelIOError(f"{self.what}: the config of {self.path} changed while it was "
                               "being read")
        return params

    def load_heads(self) -> heads.IctHeads | None:
        return ict_dir.load_heads(self.path, self.config) if self.is_ict else None

    def tokenizer(self, spec: str | None = None) -> Tokenizer:
        """`spec` if given, else the tokenizer files beside the weights, else the builtin one
        when the run recorded it; its ids must fit the model's vocab."""
        if spec:
            tok = load_tokenizer(spec)
        elif self.tokenizer_dir is not None:
            tok = load_tokenizer(self.tokenizer_dir)
        elif self.settings.tokenizer == "builtin":
            tok = load_tokenizer("builtin")
        else:
            looked = [str(self.path), str(self.path / "tokenizer")]
            raise ModelIOError(f"{self.path} has no tokenizer files (looked in {looked}); pass "
                               "--tokenizer (builtin, a tokenizer.model or a tokenizer dir)")
        if tok.vocab_size > self.config.vocab_size:
            raise ModelIOError(f"{self.what}: the tokenizer has {tok.vocab_size} ids but the "
                               f"model's vocab is {self.config.vocab_size}; pass the right "
                               "--tokenizer")
        return tok

    def default_exits(self) -> tuple[int, ...]:
        """The ICT heads' exits; else the run's eval / train exits (unless just the last
        layer, as an SFT run's are); else the SoFT default set."""
        big_l = self.config.num_hidden_layers
        if self.head_exits is not None:
            return self.head_exits
        for text in (self.settings.eval_exits, self.settings.train_exits):
            if text and str(text).strip():
                try:
                    exits = soft.resolve_exits(str(text), big_l)
                except soft.ExitError:
                    continue
                if exits != (big_l,):
                    return exits
        return soft.default_exits(big_l)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model read into memory: config, weights and tokenizer (`load_model`)."""

    config: LlamaConfig
    params: dict
    tokenizer: Tokenizer | None
    path: Path


def load_model(path: str | Path, *, step: int | None = None, dtype: Any = None) -> LoadedModel:
    """Config, weights and tokenizer of any checkpoint `inspect` reads (no tokenizer found:
    None)."""
    art = inspect(path, what="model")
    try:
        tok = art.tokenizer()
    except ModelIOError:
        tok = None
    return LoadedModel(art.config, art.load_params(step, dtype), tok, art.path)


def inspect(path: str | Path, what: str = "checkpoint") -> Artifact:
    """Validate `path` as a model dir, workdir, ICT dir, HF dir or GGUF file and read everything
    but weights."""
    p = model_io.require_filesystem_path(path, what)
    kind = model_io.model_kind(p, what)
    config = model_io.load_config(p)
    if kind in (HF_DIR, GGUF_FILE):
        return Artifact(p, kind, config, RunSettings(), None, model_io.find_tokenizer_dir(p),
                        what)
    settings = read_run_settings(p, ict_dir.read_meta(p))
    return Artifact(p, kind, config, settings, ict_dir.head_exits(p),
                    model_io.find_tokenizer_dir(p), what)
