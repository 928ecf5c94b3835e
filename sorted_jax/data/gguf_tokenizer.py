"""The tokenizer a GGUF file (llama.cpp) carries in its metadata, as HF tokenizer files.

A GGUF has no tokenizer files: its `tokenizer.ggml.*` keys hold the vocabulary and how to use
it. Two kinds are read (`tokenizer.ggml.model`):

* ``llama`` -- a SentencePiece vocabulary (LLaMA 1/2, Mistral, TinyLlama): pieces, scores and
  piece types. They are written back into a SentencePiece ``tokenizer.model`` (with the
  normalizer llama.cpp applies: a dummy prefix unless ``add_space_prefix`` is false, spaces
  kept as they are) beside a ``tokenizer_config.json``, the layout `tokenizers.HFTokenizer`
  reads with ids equal to SentencePiece's (and llama.cpp's). transformers' own GGUF tokenizer
  differs on runs of spaces (``"  x"``, code indentation), so it is not used for these.
* ``gpt2`` -- byte-level BPE (Llama 3, SmolLM2, ...): vocabulary, merges and pre-tokenizer
  name, rebuilt by transformers' GGUF support and saved with ``save_pretrained``.

Either way the special tokens, ``add_bos_token`` and the chat template come from the metadata.
The ``gguf`` package reads the file (the ``gguf`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sorted_jax.core.errors import DataError

GGUF_MAGIC = b"GGUF"  # the first bytes of a GGUF file
_PIECE_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED",
                6: "BYTE"}  # llama.cpp's token types = SentencePiece's piece types


def is_gguf_file(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _metadata(path: Path) -> dict[str, Any]:
    try:
        import gguf  # optional extra: only for GGUF files
    except ImportError:
        raise DataError(f"the tokenizer of GGUF file {path} needs the gguf package: "
                        "pip install -e '.[gguf]'") from None
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is truncated or not a valid GGUF file ({e}); "
                        "re-download it") from None
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def tokenizer_model(path: str | Path) -> str:
    """The GGUF's `tokenizer.ggml.model` ("llama", "gpt2", ...)."""
    model = _metadata(Path(path)).get("tokenizer.ggml.model")
    if model is None:
        raise DataError(f"GGUF file {path} has no tokenizer (no tokenizer.ggml.model); pass "
                        "--tokenizer / data.tokenizer")
    return str(model)


def _sentencepiece_files(path: Path, meta: dict[str, Any], out: Path) -> list[Path]:
    from sentencepiece import sentencepiece_model_pb2 as pb  # with sentencepiece (lazy)

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    proto = pb.ModelProto()
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = 6 in types

    def special(key: str, default: int) -> int:
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        return default if value is None else int(value)

    spec.unk_id, spec.bos_id = special("unknown", 0), special("bos", -1)
    spec.eos_id, spec.pad_id = special("eos", -1), special("padding", -1)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces",
                                                  False))
    norm.escape_whitespaces = True
    charsmap = meta.get("tokenizer.ggml.precompiled_charsmap")
    if charsmap:
        norm.precompiled_charsmap = bytes(charsmap)
    for token, score, kind in zip(tokens, scores, types, strict=True):
        piece = proto.pieces.add()
        piece.piece, piece.score = token, float(score)
        piece.type = getattr(pb.ModelProto.SentencePiece.Type, _PIECE_TYPES.get(int(kind),
                                                                                 "NORMAL"))
    model_file = out / "tokenizer.model"
    model_file.write_bytes(proto.SerializeToString())
    config = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))}
    for name, tid in (("bos_token", spec.bos_id), ("eos_token", spec.eos_id),
                      ("unk_token", spec.unk_id), ("pad_token", spec.pad_id)):
        if 0 <= tid < len(tokens):
            config[name] = tokens[tid]
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    config_file = out / "tokenizer_config.json"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return [model_file, config_file]


def gguf_tokenizer_files(path: str | Path, out: str | Path) -> list[Path]:
    """Write the tokenizer GGUF file `path` describes into dir `out` as HF tokenizer files;
    returns the written paths."""
    p, out = Path(path), Path(out)
    meta = _metadata(p)
    model = meta.get("tokenizer.ggml.model")
    out.mkdir(parents=True, exist_ok=True)
    if model == "llama":
        return _sentencepiece_files(p, meta, out)
    if model is None:
        raise DataError(f"GGUF file {p} has no tokenizer (no tokenizer.ggml.model); pass "
                        "--tokenizer / data.tokenizer")
    from transformers import AutoTokenizer  # lazy: heavy import

    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name,
                                            local_files_only=True)
    except ValueError as e:  # a tokenizer kind transformers cannot rebuild
        raise DataError(f"cannot rebuild the {model!r} tokenizer of GGUF file {p}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    return [Path(f) for f in tok.save_pretrained(str(out))]
