"""Tokenizers: builtin bytes, SentencePiece, HF dir (ids must equal SentencePiece's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sorted_jax.data.tokenizers import (
    BUILTIN_MARKER,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    save_tokenizer_files,
)

ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets"

TRICKY = [
    "Hello world",
    " leading space",
    "  two  spaces  ",
    "a\nb\n\n c",
    "émoji 🤗 and 中文",
    "literal <s> and </s> markers",
    "",
]


def _asset(name: str) -> Path:
    path = ASSETS / name
    if not path.is_file():
        pytest.skip(f"asset {name} not found at {path}")
    return path


def _alpaca_texts() -> list[str]:
    records = json.loads(_asset("alpaca_en_demo.json").read_text())
    texts = []
    for r in records:
        texts += [r["instruction"], r["input"], r["output"]]
    return texts


@pytest.fixture(scope="module")
def sp_tok() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(_asset("llama2_tokenizer.model"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf_tok")
    shutil.copyfile(_asset("llama2_tokenizer.model"), d / "tokenizer.model")
    return d


def test_builtin_roundtrip():
    tok = load_tokenizer("builtin")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size % 8 == 0 and tok.vocab_size >= 259
    for text in TRICKY:
        ids = tok.encode(text)
        assert all(3 <= i < 259 for i in ids)
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text


def test_sentencepiece_llama2(sp_tok):
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.vocab_size) == (1, 2, 32000)
    ids = sp_tok.encode("Hello world")
    assert ids == [15043, 3186]  # no BOS, LLaMA-2 ids
    assert sp_tok.decode(ids) == "Hello world"
    assert 0 <= sp_tok.pad_id < sp_tok.vocab_size


def test_sentencepiece_tok512():
    tok = load_tokenizer(str(_asset("tok512.model")))
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 512
    text = "Once upon a time there was a little dog."
    assert tok.decode(tok.encode(text)) == text


def test_hf_dir_ids_match_sentencepiece(sp_tok, hf_dir):
    hf = load_tokenizer(str(hf_dir))
    assert isinstance(hf, HFTokenizer)
    assert (hf.bos_id, hf.eos_id, hf.vocab_size) == (1, 2, 32000)
    texts = TRICKY + _alpaca_texts()
    mismatches = [t for t in texts if hf.encode(t) != sp_tok.encode(t)]
    assert not mismatches, f"{len(mismatches)} texts differ, e.g. {mismatches[0]!r}"
    assert hf.encode_batch(texts) == sp_tok.encode_batch(texts) == [sp_tok.encode(t) for t in texts]
    assert hf.decode(hf.encode("Hello world")) == "Hello world"


def test_save_sentencepiece_files_for_hf_export(tmp_path, sp_tok):
    written = save_tokenizer_files(str(_asset("llama2_tokenizer.model")), tmp_path / "model")
    assert {p.name for p in written} == {"tokenizer.model", "tokenizer_config.json"}
    reloaded = load_tokenizer(str(tmp_path / "model"))
    assert isinstance(reloaded, HFTokenizer)
    for text in TRICKY + _alpaca_texts()[:300]:
        assert reloaded.encode(text) == sp_tok.encode(text)
    # Users of the exported HF model get LLaMA's usual BOS from plain AutoTokenizer calls.
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tmp_path / "model"), local_files_only=True)
    assert auto.encode("Hello world") == [1, 15043, 3186]


def test_save_builtin_and_hf_dir(tmp_path, hf_dir):
    (written,) = save_tokenizer_files("builtin", tmp_path / "b")
    assert written.name == BUILTIN_MARKER
    assert isinstance(load_tokenizer(str(tmp_path / "b")), ByteTokenizer)
    written = save_tokenizer_files(str(hf_dir), tmp_path / "h")
    assert [p.name for p in written] == ["tokenizer.model"]
    assert (tmp_path / "h" / "tokenizer.model").read_bytes() == (
        hf_dir / "tokenizer.model"
    ).read_bytes()


def test_missing_paths_have_clear_errors(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="has no"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.model"):
        save_tokenizer_files(str(missing), tmp_path / "out")
