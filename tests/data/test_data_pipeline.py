"""Tokenized examples, batches, buckets, deterministic shuffling, resume and process sharding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sorted_jax.data.builtin import builtin_records
from sorted_jax.data.pipeline import (
    BATCH_KEYS,
    DataIterator,
    EvalIterator,
    TokenizedDataset,
    choose_bucket,
    default_buckets,
    steps_per_epoch,
    tokenize_example,
    tokenize_records,
)
from sorted_jax.data.templates import format_example
from sorted_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer

ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets"


def _asset(name: str) -> Path:
    path = ASSETS / name
    if not path.is_file():
        pytest.skip(f"asset {name} not found at {path}")
    return path


@pytest.fixture(scope="module")
def llama_tok() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(_asset("llama2_tokenizer.model"))


@pytest.fixture(scope="module")
def alpaca_records() -> list[dict]:
    return json.loads(_asset("alpaca_en_demo.json").read_text())


@pytest.fixture(scope="module")
def toy() -> TokenizedDataset:
    """Builtin records, byte tokenizer: lengths vary from ~10 to ~60 tokens."""
    return tokenize_records(builtin_records("train")[:203], ByteTokenizer(), 64, "plain")


def test_loss_mask_is_exactly_response_and_eos_llama2(llama_tok, alpaca_records):
    ds = tokenize_records(alpaca_records, llama_tok, max_len=4096)
    assert len(ds) == len(alpaca_records) and ds.num_dropped == ds.num_truncated == 0
    for rec, toks, mask in zip(alpaca_records, ds.tokens, ds.loss_masks, strict=True):
        prompt, response = format_example(rec)
        assert toks[0] == llama_tok.bos_id and toks[-1] == llama_tok.eos_id
        n_ctx = int(np.argmax(mask))
        assert mask[:n_ctx].sum() == 0 and mask[n_ctx:].all()  # one contiguous suffix
        # The context is BOS + the prompt encoded alone (what generation will feed).
        assert toks[1:n_ctx].tolist() == llama_tok.encode(prompt)
        assert llama_tok.decode(toks[mask][:-1]) == response
        assert llama_tok.decode(toks[1:]) == prompt + response
        # The batched path equals the one-record path.
        one_toks, one_mask, _ = tokenize_example(llama_tok, prompt, response, 4096)
        np.testing.assert_array_equal(toks, one_toks)
        np.testing.assert_array_equal(mask, one_mask)


def test_batch_targets_and_mask_alignment(llama_tok, alpaca_records):
    records = alpaca_records[:4]
    ds = tokenize_records(records, llama_tok, max_len=1024)
    it = DataIterator(ds, 4, shuffle=False, buckets=[128, 256, 512, 1024])
    batch = next(it)
    assert set(batch) == set(BATCH_KEYS)
    for rec, ids, tgt, lm, am in zip(
        records,
        batch["input_ids"],
        batch["targets"],
        batch["loss_mask"],
        batch["attention_mask"],
        strict=True,
    ):
        n = int(am.sum())
        assert am[:n].all() and not am[n:].any()  # right padding
        np.testing.assert_array_equal(tgt[: n - 1], ids[1:n])
        predicted = tgt[lm == 1]
        assert predicted[-1] == llama_tok.eos_id
        assert llama_tok.decode(predicted[:-1]) == rec["output"]
        # The last real position predicts nothing (its target would be padding).
        assert lm[n - 1 :].sum() == 0


def test_batch_dtypes_shapes_and_bucket_padding(toy):
    buckets = [16, 24, 32, 40, 48, 64]
    it = DataIterator(toy, 8, seed=0, buckets=buckets)
    seen_lengths = set()
    for _ in range(10):
        idx = it.global_indices(it.epoch, it.index // 8)
        batch = next(it)
        longest = int(toy.lengths[idx].max())
        T = batch["input_ids"].shape[1]
        assert T == choose_bucket(longest, buckets) and T in buckets
        seen_lengths.add(T)
        dtypes = {k: v.dtype for k, v in batch.items()}
        assert dtypes == {
            "input_ids": np.int32,
            "targets": np.int32,
            "loss_mask": np.float32,
            "attention_mask": np.int32,
            "positions": np.int32,
        }
        assert all(v.shape == (8, T) for v in batch.values())
        np.testing.assert_array_equal(batch["positions"][3], np.arange(T))
        pad = batch["attention_mask"] == 0
        assert (batch["input_ids"][pad] == toy.pad_id).all()
        assert (batch["loss_mask"][pad] == 0).all()
        assert batch["attention_mask"].sum() == toy.lengths[idx].sum()
    assert len(seen_lengths) >= 2  # the toy set really spans several buckets


def test_default_buckets():
    assert default_buckets(512) == [32, 64, 128, 256, 512]
    assert default_buckets(300, min_len=64) == [64, 128, 256, 300]
    assert default_buckets(16) == [16]
    with pytest.raises(ValueError, match="exceeds"):
        choose_bucket(513, default_buckets(512))
    ds = tokenize_records(builtin_records("train")[:8], ByteTokenizer(), 64, "plain")
    with pytest.raises(ValueError, match="reach max_len"):
        DataIterator(ds, 8, buckets=[16, 32])


def test_truncation_policy():
    tok = ByteTokenizer()
    prompt, response = "P" * 10, "R" * 30
    toks, mask, truncated = tokenize_example(tok, prompt, response, max_len=20)
    # Prompt kept whole, response cut from the right, EOS lost.
    assert truncated and len(toks) == 20
    assert tok.decode(toks) == prompt + "R" * 9 and toks[-1] != tok.eos_id
    assert mask.sum() == 9 and not mask[:11].any()
    # Exactly fits: nothing truncated, EOS kept.
    toks, mask, truncated = tokenize_example(tok, prompt, "R" * 8, max_len=20)
    assert not truncated and len(toks) == 20 and toks[-1] == tok.eos_id
    # BOS + prompt fills max_len: no response token fits -> dropped and counted.
    assert tokenize_example(tok, "P" * 19, "R", max_len=20) is None
    assert tokenize_example(tok, "P" * 18, "R", max_len=20) is not None
    records = [
        {"instruction": "P" * 25, "input": "", "output": "x"},
        {"instruction": "P" * 5, "input": "", "output": "R" * 40},
        {"instruction": "ok", "input": "", "output": "fine"},
    ]
    ds = tokenize_records(records, tok, max_len=20, template="plain")
    assert (len(ds), ds.num_dropped, ds.num_truncated) == (2, 1, 1)
    assert int(ds.lengths.max()) == 20


def test_shuffle_deterministic_per_seed_and_epoch(toy):
    g = 8
    spe = steps_per_epoch(len(toy), g)
    assert spe == len(toy) // g == 25

    def stream(seed, steps):
        it = DataIterator(toy, g, seed=seed)
        return [next(it) for _ in range(steps)]

    a, b = stream(5, 2 * spe), stream(5, 2 * spe)
    for x, y in zip(a, b, strict=True):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    it = DataIterator(toy, g, seed=5)
    e0 = np.concatenate([it.global_indices(0, s) for s in range(spe)])
    e1 = np.concatenate([it.global_indices(1, s) for s in range(spe)])
    assert len(set(e0.tolist())) == len(e0) == spe * g  # an epoch never repeats an example
    assert not np.array_equal(e0, e1)
    other = DataIterator(toy, g, seed=6)
    assert not np.array_equal(e0, np.concatenate([other.global_indices(0, s) for s in range(spe)]))
    # The stream follows global_indices, and the epoch rolls over after spe steps.
    it = DataIterator(toy, g, seed=5)
    first = [next(it) for _ in range(spe + 1)]
    assert it.state_dict()["epoch"] == 1
    rows0 = [toy.tokens[i] for i in e1[:g]]
    for row, toks in zip(first[-1]["input_ids"], rows0, strict=True):
        np.testing.assert_array_equal(row[: len(toks)], toks)


def test_resume_continues_identical_stream(toy):
    g = 8
    ref = DataIterator(toy, g, seed=3)
    for _ in range(20):
        next(ref)
    state = json.loads(json.dumps(ref.state_dict()))  # survives a JSON round trip
    assert state == {
        "epoch": 0,
        "index": 160,
        "seed": 3,
        "num_examples": 203,
        "global_batch_size": 8,
    }
    expected = [next(ref) for _ in range(12)]  # crosses into epoch 1
    resumed = DataIterator(toy, g, seed=3)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(got[k], want[k])
    assert resumed.state_dict() == ref.state_dict()
    with pytest.raises(ValueError, match="seed=3"):
        DataIterator(toy, g, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        DataIterator(toy, 4, seed=3).load_state_dict(state)


@pytest.mark.parametrize("nproc", [2, 4])
def test_process_sharding_union_is_global_batch(toy, nproc):
    g = 8
    single = DataIterator(toy, g, seed=1, buckets=[16, 32, 48, 64])
    procs = [
        DataIterator(toy, g, seed=1, buckets=[16, 32, 48, 64], process_index=p, process_count=nproc)
        for p in range(nproc)
    ]
    for _ in range(30):
        want = next(single)
        parts = [next(it) for it in procs]
        for k in BATCH_KEYS:
            assert {p[k].shape for p in parts} == {(g // nproc, want[k].shape[1])}
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k])
    assert all(it.state_dict() == single.state_dict() for it in procs)


def test_bucket_comes_from_global_batch():
    tok = ByteTokenizer()
    records = [{"instruction": "x" * n, "input": "", "output": "y"} for n in (50, 2, 2, 2)]
    ds = tokenize_records(records, tok, 64, "plain")
    kw = dict(shuffle=False, buckets=[16, 64], process_count=2)
    shard1 = next(DataIterator(ds, 4, process_index=1, **kw))  # rows 2-3: short
    assert shard1["input_ids"].shape == (2, 64)


def test_sharding_rejects_bad_batch(toy):
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        DataIterator(toy, 8, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        DataIterator(toy, 8, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="cannot fill"):
        DataIterator(toy, 256)


@pytest.mark.parametrize("nproc", [1, 2])
def test_eval_iterator_covers_every_example_once(nproc):
    tok = ByteTokenizer()
    held = builtin_records("eval")[:10]
    ds = tokenize_records(held, tok, 64, "plain")
    iters = [EvalIterator(ds, 4, process_index=p, process_count=nproc) for p in range(nproc)]
    assert len(iters[0]) == 3
    batches = [list(it) for it in iters]
    assert all(len(b) == 3 for b in batches)
    rows = []
    for step in range(3):
        merged = {k: np.concatenate([b[step][k] for b in batches]) for k in BATCH_KEYS}
        assert merged["input_ids"].shape[0] == 4
        for ids, lm, am in zip(
            merged["input_ids"], merged["loss_mask"], merged["attention_mask"], strict=True
        ):
            assert am.any()  # filler rows are real sequences: attention is never empty
            if lm.any():
                rows.append(tok.decode(ids[am == 1]))
    want = [p + r for p, r in (format_example(rec, "plain") for rec in held)]
    assert rows == want  # in order, none dropped, fillers carry no loss
    assert len(list(iters[0])) == 3  # a new pass each time
