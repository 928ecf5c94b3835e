"""Reading an HF LLaMA dir: which weight files it has, its config, and a tokenizer that fits.

An HF dir holds `config.json` (+ `generation_config.json`), the weights as safetensors (one
file, or shards with `model.safetensors.index.json`) or as `pytorch_model*.bin`, and tokenizer
files. `read_hf_checkpoint` checks all of it before it reads any tensor (`hf_weights`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sorted_jax.core.errors import ConversionError
from sorted_jax.io.hf_weights import listing, read_bins, read_safetensors
from sorted_jax.io.param_tree import place_params, resolve_dtype
from sorted_jax.io.safetensors_shards import SAFE_INDEX, SAFE_SINGLE
from sorted_jax.model.config import ConfigError, LlamaConfig

CONFIG_FILE = "config.json"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
GENERATION_CONFIG_FILE = "generation_config.json"


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e


def _shards_from_index(hf_dir: Path, index_name: str) -> tuple[list[Path], dict[str, str]]:
    index = _load_json(hf_dir / index_name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{hf_dir / index_name} has no 'weight_map'; the index is corrupt")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (hf_dir / f).is_file()]
    if missing:
        raise ConversionError(f"{hf_dir / index_name} lists shard files that are missing: "
                              f"{listing(missing)}; download every shard")
    return [hf_dir / f for f in files], weight_map


def has_hf_weights(path: Path) -> bool:
    """Whether `path` is a dir with an HF config.json and weight files beside it."""
    p = Path(path)
    if not (p / CONFIG_FILE).is_file():
        return False
    return (any((p / f).is_file() for f in (SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE))
            or any(p.glob("model-*-of-*.safetensors")))


def find_hf_weights(hf_dir: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    """('safetensors' | 'bin', files, weight_map or None), preferring safetensors."""
    if (hf_dir / SAFE_INDEX).is_file():
        return ("safetensors", *_shards_from_index(hf_dir, SAFE_INDEX))
    if (hf_dir / SAFE_SINGLE).is_file():
        return "safetensors", [hf_dir / SAFE_SINGLE], None
    shards = sorted(hf_dir.glob("model-*-of-*.safetensors"))
    if shards:
        return "safetensors", shards, None
    if (hf_dir / BIN_INDEX).is_file():
        return ("bin", *_shards_from_index(hf_dir, BIN_INDEX))
    if (hf_dir / BIN_SINGLE).is_file():
        return "bin", [hf_dir / BIN_SINGLE], None
    raise ConversionError(
        f"no weights found in {hf_dir}: expected {SAFE_SINGLE}, {SAFE_INDEX} with its shards, "
        f"{BIN_SINGLE} or {BIN_INDEX}")


# ---------------------------------------------------------------------------------------------
# config


def with_generation_eos(config: LlamaConfig, hf_dir: Path) -> LlamaConfig:
    """`config` with the EOS id(s) of `hf_dir`'s generation_config.json, which HF `generate`
    stops on (Llama-3-Instruct lists several there: 128001, 128008, 128009) and which may
    differ from config.json's; kept as a list when it is one."""
    f = hf_dir / GENERATION_CONFIG_FILE
    if not f.is_file():
        return config
    gen = _load_json(f)
    eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
    if eos is None:
        return config
    ids = eos if isinstance(eos, list) else [eos]
    if not ids or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
        raise ConversionError(f"{f}: eos_token_id must be a token id or a list of them, got "
                              f"{eos!r}")
    return config.replace(eos_token_id=eos)


def read_hf_config(hf_dir: Path) -> LlamaConfig:
    """The model config of an HF dir: config.json, with generation_config.json's EOS ids."""
    cfg_file = hf_dir / CONFIG_FILE
    if not cfg_file.is_file():
        raise ConversionError(f"{cfg_file} is missing: an HF model dir needs its config.json")
    d = _load_json(cfg_file)
    if not isinstance(d, dict):
        raise ConversionError(f"{cfg_file} is not a JSON object (an HF config.json maps names "
                              "to values)")
    model_type = d.get("model_type", "llama")
    if model_type != "llama":
        raise ConversionError(f"{hf_dir} holds an HF {model_type!r} model (model_type in "
                              f"{cfg_file.name}); sorted_jax reads LLaMA-architecture models "
                              "(model_type 'llama') only")
    try:
        config = LlamaConfig.from_hf_dict(d)
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"{cfg_file} is not a usable LLaMA config: {e}") from e
    return with_generation_eos(config, hf_dir)


# ---------------------------------------------------------------------------------------------
# tokenizer


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e


def _tokenizer_json_ids(tj: Mapping[str, Any]) -> int | None:
    """How many ids a tokenizer.json can emit (its vocab and added tokens), or None."""
    vocab = (tj.get("model") or {}).get("vocab")
    ids: list[int] = []
    if isinstance(vocab, dict):
        ids += [int(i) for i in vocab.values()]
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], ids are positions
        ids.append(len(vocab) - 1)
    ids += [int(t["id"]) for t in tj.get("added_tokens") or [] if "id" in t]
    return max(ids) + 1 if ids else None


def tokenizer_vocab_size(directory: Path) -> tuple[int, str] | None:
    """(number of token ids the tokenizer can emit, which file says so), or None if none."""
    found: list[tuple[int, str]] = []
    spm_file = directory / "tokenizer.model"
    if spm_file.is_file():
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(spm_file))
        except (OSError, RuntimeError) as e:
            raise ConversionError(f"{spm_file} is not a readable SentencePiece model: {e}") from e
        found.append((sp.GetPieceSize(), str(spm_file)))
    tok_json = directory / "tokenizer.json"
    if tok_json.is_file():
        n = _tokenizer_json_ids(_json_file(tok_json))
        if n is not None:
            found.append((n, str(tok_json)))
    tok_cfg = directory / "tokenizer_config.json"
    if tok_cfg.is_file():
        added = _json_file(tok_cfg).get("added_tokens_decoder") or {}
        if added:
            found.append((max(int(i) for i in added) + 1,
                          str(tok_cfg) + " (added_tokens_decoder)"))
    # the largest count wins; among equal counts, the first file found
    return max(found, key=lambda f: f[0]) if found else None


def check_tokenizer(directory: Path, config: LlamaConfig) -> None:
    found = tokenizer_vocab_size(directory)
    if found is not None and found[0] > config.vocab_size:
        raise ConversionError(
            f"the tokenizer ({found[1]}) has {found[0]} token ids but the model's vocab_size is "
            f"{config.vocab_size}: ids >= {config.vocab_size} would have no embedding. Use the "
            "tokenizer that belongs to this checkpoint (or fix vocab_size in config.json)")


# ---------------------------------------------------------------------------------------------
# the whole checkpoint


def read_hf_checkpoint(hf_dir: str | Path, dtype: Any = "float32", allow_pickle: bool = False,
                       progress: bool = True, shardings: Any = None) -> tuple[dict, LlamaConfig]:
    """(params in our layout, config) from an HF LLaMA directory: numpy arrays, or with
    `shardings` `jax.Array`s placed leaf by leaf (safetensors: each leaf read, placed and
    dropped, `hf_weights.read_safetensors`; `.bin`: read whole, then placed)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"HF model dir {hf_dir} does not exist")
    config = read_hf_config(hf_dir)
    check_tokenizer(hf_dir, config)
    kind, files, weight_map = find_hf_weights(hf_dir)
    np_dtype = resolve_dtype(dtype) or np.dtype(np.float32)
    if kind == "safetensors":
        return read_safetensors(files, weight_map, config, np_dtype, hf_dir, progress,
                                shardings), config
    params = read_bins(files, config, np_dtype, hf_dir, allow_pickle, progress)
    return (params if shardings is None else place_params(params, shardings)), config
