"""Tokenizers behind one small protocol, loaded from a spec string.

Specs accepted by :func:`load_tokenizer`:

* ``"builtin"`` -- a byte-level tokenizer that needs no file (the default tiny job);
* a path to a SentencePiece ``.model`` file (e.g. LLaMA-2's ``tokenizer.model``);
* a directory: a model dir written by :func:`save_tokenizer_files` for ``builtin``, or a
  Hugging Face tokenizer dir (``tokenizer.model`` and/or ``tokenizer.json``) loaded with
  ``transformers.AutoTokenizer``;
* a GGUF file (llama.cpp): the tokenizer its metadata describes (SentencePiece or BPE
  vocabulary, special ids, chat template), written as HF tokenizer files
  (`gguf_tokenizer.gguf_tokenizer_files`) and loaded as an :class:`HFTokenizer`.

``encode`` never adds BOS/EOS: the pipeline adds them itself, because transformers 5.x adds BOS on
some loading paths and not on others. Text is always encoded as plain text: a literal ``"</s>"``
in the data is *not* turned into the EOS id. Whether a sequence starts with BOS follows the
tokenizer (``add_bos``, see `bos_prefix`): the byte and SentencePiece tokenizers want one, an HF
tokenizer dir wants one iff its own encoding adds it (LLaMA-2's does, SmolLM2's does not). Chat
templates (`sorted_jax.data.chat`) write their own BOS, if any.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sorted_jax.core.errors import DataError, MissingFileError
from sorted_jax.data.gguf_tokenizer import gguf_tokenizer_files, is_gguf_file

BUILTIN_MARKER = "sorted_jax_tokenizer.json"
# Files of a Hugging Face tokenizer dir that are copied into an exported model dir.
HF_TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, generation and evaluation need from a tokenizer."""

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int:
        """Id written into padding slots; always masked out, so any valid id works."""
        ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        ...

    def decode(self, ids: Any) -> str:
        """Text of ``ids``; special ids (pad/BOS/EOS) are skipped."""
        ...


def bos_prefix(tokenizer: Tokenizer) -> list[int]:
    """``[bos_id]`` if sequences of this tokenizer start with BOS (its ``add_bos``, true when a
    tokenizer does not say), else ``[]``."""
    return [tokenizer.bos_id] if getattr(tokenizer, "add_bos", True) else []


class ByteTokenizer:
    """UTF-8 bytes as tokens: pad=0, bos=1, eos=2, byte b -> 3 + b.

    Needs no file, so the default job runs anywhere. Ids 259..263 are reserved (never produced)
    so that the vocabulary (264) divides by 8 and shards evenly on a ``vocab`` mesh axis.
    """

    PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
    VOCAB_SIZE = 264

    bos_id = BOS
    eos_id = EOS
    pad_id = PAD
    vocab_size = VOCAB_SIZE
    spec = "builtin"
    add_bos = True

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Any) -> str:
        data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < self.OFFSET + 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file read with the ``sentencepiece`` package."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        self.spec = str(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:  # not a SentencePiece model at all
            hint = (" (a JSON file: pass the directory that holds tokenizer.json)"
                    if Path(model_file).suffix == ".json" else "")
            raise DataError(f"tokenizer {str(model_file)!r} is not a SentencePiece .model "
                            f"file{hint}: {str(e).splitlines()[0][:200]}") from None
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise DataError(f"{model_file}: SentencePiece model has no BOS/EOS piece")
        pad = int(self._sp.pad_id())
        # LLaMA models have no pad piece (pad_id = -1); padded slots are masked, so use unk/0.
        self.pad_id = pad if pad >= 0 else max(int(self._sp.unk_id()), 0)
        self.vocab_size = int(self._sp.vocab_size())
        self.add_bos = True  # LLaMA's SentencePiece models are trained with a leading BOS

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.encode(texts, out_type=int, num_threads=-1)]

    def decode(self, ids: Any) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.model_file)!r})"


class HFTokenizer:
    """A Hugging Face tokenizer dir loaded offline with ``AutoTokenizer``.

    BOS/EOS are never added by transformers here (``add_special_tokens=False``) and special-token
    strings in the text are split like ordinary text, so ids equal SentencePiece's own encoding.
    ``add_bos`` is whether the tokenizer's own encoding starts with BOS; ``hf`` is the
    transformers tokenizer (its chat template: `sorted_jax.data.chat`).
    """

    def __init__(self, directory: str | Path, spec: str | None = None):
        from transformers import AutoTokenizer  # lazy: heavy import

        self.directory = Path(directory)
        self.spec = spec or str(directory)  # a GGUF's tokenizer: the GGUF file
        self._tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        bos, eos = self._tok.bos_token_id, self._tok.eos_token_id
        if eos is None:
            raise DataError(f"{directory}: tokenizer has no EOS token")
        # No BOS token (Qwen-style tokenizers): sequences never start with one.
        self.bos_id, self.eos_id = (None if bos is None else int(bos)), int(eos)
        pad = self._tok.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.vocab_size = len(self._tok)
        probe = "a"
        with_special = list(self._tok(probe)["input_ids"])
        self.add_bos = (bos is not None and bool(with_special) and with_special[0] == bos
                        and self.encode(probe)[:1] != [bos])

    @property
    def hf(self) -> Any:
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False, split_special_tokens=True))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        out = self._tok(texts, add_special_tokens=False, split_special_tokens=True)
        return [list(ids) for ids in out["input_ids"]]

    def decode(self, ids: Any) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.spec!r})"


def gguf_tokenizer(path: str | Path) -> HFTokenizer:
    """The tokenizer a GGUF file carries (its files are written to a temp dir, loaded, and
    deleted: nothing is written beside the GGUF)."""
    with tempfile.TemporaryDirectory(prefix="sorted_jax_gguf_tokenizer_") as tmp:
        gguf_tokenizer_files(path, tmp)
        return HFTokenizer(tmp, spec=str(path))


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """Load a tokenizer from ``"builtin"``, a ``.model`` file, or a tokenizer/model dir."""
    if str(spec) == "builtin":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        raise MissingFileError(
            f"tokenizer {str(spec)!r} not found: expected 'builtin', a SentencePiece .model file, "
            "or a directory with tokenizer.model / tokenizer.json"
        )
    if is_gguf_file(path):
        return gguf_tokenizer(path)
    if path.is_file():
        return SentencePieceTokenizer(path)
    if (path / BUILTIN_MARKER).is_file():
        marker = json.loads((path / BUILTIN_MARKER).read_text())
        if marker.get("type") != "builtin_bytes":
            raise DataError(f"{path / BUILTIN_MARKER}: unknown tokenizer type {marker!r}")
        return ByteTokenizer()
    if any((path / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        return HFTokenizer(path)
    raise MissingFileError(
        f"tokenizer dir {str(path)!r} has no {BUILTIN_MARKER}, tokenizer.model or tokenizer.json"
    )


def save_tokenizer_files(tokenizer_spec: str | Path, out_dir: str | Path) -> list[Path]:
    """Copy the tokenizer named by ``tokenizer_spec`` into ``out_dir`` (a model dir).

    ``load_tokenizer(out_dir)`` then gives the same ids. For a ``.model`` file this writes
    ``tokenizer.model`` plus a ``tokenizer_config.json`` that makes HF ``AutoTokenizer`` add BOS
    by default with ids equal to SentencePiece's. ``builtin`` writes a small JSON marker. A GGUF
    file's tokenizer is written as HF tokenizer files (``save_pretrained``).
    Returns the written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if str(tokenizer_spec) == "builtin":
        marker = out / BUILTIN_MARKER
        marker.write_text(
            json.dumps({"type": "builtin_bytes", "vocab_size": ByteTokenizer.VOCAB_SIZE}) + "\n"
        )
        return [marker]
    src = Path(tokenizer_spec).expanduser()
    if not src.exists():
        raise MissingFileError(f"tokenizer {str(tokenizer_spec)!r} not found")
    if is_gguf_file(src):
        return gguf_tokenizer_files(src, out)
    if src.is_file():
        sp = SentencePieceTokenizer(src)
        model = out / "tokenizer.model"
        shutil.copyfile(src, model)
        config = {
            # No tokenizer_class: transformers 5.x then builds its generic fast tokenizer,
            # whose ids match SentencePiece (its LlamaTokenizer class differs on whitespace).
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": sp.piece(sp.bos_id),
            "eos_token": sp.piece(sp.eos_id),
            "unk_token": sp.piece(max(int(sp._sp.unk_id()), 0)),
        }
        cfg = out / "tokenizer_config.json"
        cfg.write_text(json.dumps(config, indent=2) + "\n")
        return [model, cfg]
    if (src / BUILTIN_MARKER).is_file():
        return save_tokenizer_files("builtin", out)
    written = []
    for name in HF_TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            written.append(out / name)
    if not written:
        raise MissingFileError(f"tokenizer dir {str(src)!r} has no tokenizer files to copy")
    return written
