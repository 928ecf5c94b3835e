"""Packing: rows, the packed batch layout, a deterministic and resumable stream, and a packed
train step whose loss and gradients equal the unpacked ones on the same examples."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest
from helpers import W32_3L

from sorted_jax.data import (
    DataError,
    DataIterator,
    PackedIterator,
    SentencePieceTokenizer,
    TokenizedDataset,
    collate,
    collate_packed,
    pack_rows,
    tokenize_records,
)
from sorted_jax.model import modeling
from sorted_jax.parallel import sharding
from sorted_jax.training import train_step

CFG = W32_3L


def random_dataset(n: int, max_len: int, seed: int = 0, lo: int = 3, hi: int = 20
                   ) -> TokenizedDataset:
    """Examples of random ids with a random prompt/response split (mask: the response)."""
    rng = np.random.default_rng(seed)
    toks, masks = [], []
    for _ in range(n):
        length = int(rng.integers(lo, hi + 1))
        toks.append(rng.integers(3, CFG.vocab_size, length).astype(np.int32))
        m = np.zeros(length, bool)
        m[int(rng.integers(1, length)):] = True
        masks.append(m)
    return TokenizedDataset(toks, masks, pad_id=0, max_len=max_len)


def test_pack_rows_places_every_example_once_within_max_len():
    ds = random_dataset(300, 48, lo=2, hi=48)
    order = np.random.default_rng(1).permutation(len(ds))
    rows = pack_rows(ds.lengths, order, ds.max_len, window=8)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(ds)))
    assert all(ds.lengths[row].sum() <= ds.max_len for row in rows)
    assert rows == pack_rows(ds.lengths, order, ds.max_len, window=8)  # deterministic
    fill = ds.lengths.sum() / (len(rows) * ds.max_len)
    assert fill > 0.85, fill  # lengths uniform in 2..48: a hard case for an 8-row window
    with pytest.raises(DataError, match="more than max_len"):
        pack_rows(np.array([5, 60]), np.arange(2), 48)


def test_packed_batch_layout():
    ds = random_dataset(6, 32)
    rows = [[0, 1], [2], [3, 4, 5]] if ds.lengths[[3, 4, 5]].sum() <= 32 else [[0], [1], [2]]
    b = collate_packed(ds, rows)
    assert set(b) == {"input_ids", "targets", "loss_mask", "attention_mask", "positions",
                      "segment_ids"}
    assert all(v.shape == (len(rows), 32) for v in b.values())
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row, start=1):
            n = ds.lengths[i]
            sl = slice(at, at + n)
            np.testing.assert_array_equal(b["input_ids"][r, sl], ds.tokens[i])
            np.testing.assert_array_equal(b["positions"][r, sl], np.arange(n))
            assert (b["segment_ids"][r, sl] == seg).all()
            np.testing.assert_array_equal(b["targets"][r, at:at + n - 1], ds.tokens[i][1:])
            np.testing.assert_array_equal(b["loss_mask"][r, at:at + n - 1], ds.loss_masks[i][1:])
            assert b["loss_mask"][r, at + n - 1] == 0  # no target across the boundary
            at += n
        assert (b["segment_ids"][r, at:] == 0).all() and (b["attention_mask"][r, at:] == 0).all()
        assert (b["loss_mask"][r, at:] == 0).all()


def test_packed_stream_is_deterministic_resumable_and_sharded():
    ds = random_dataset(200, 40, seed=3)
    it = PackedIterator(ds, 4, seed=5)
    stream = [next(it) for _ in range(it.steps_per_epoch + 3)]  # into the second epoch
    assert it.epoch == 1
    again = PackedIterator(ds, 4, seed=5)
    for _ in range(5):
        next(again)
    resumed = PackedIterator(ds, 4, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
    for want in stream[5:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # every process takes its rows of the same global batch
    parts = [next(PackedIterator(ds, 4, seed=5, process_index=p, process_count=2))
             for p in range(2)]
    for k in stream[0]:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), stream[0][k])
    # the two streams never resume each other's positions
    with pytest.raises(DataError, match="unpacked"):
        PackedIterator(ds, 4, seed=5).load_state_dict(DataIterator(ds, 4).state_dict())
    with pytest.raises(DataError, match="packed stream"):
        DataIterator(ds, 4).load_state_dict(it.state_dict())
    with pytest.raises(DataError, match="cannot be packed into one global batch"):
        PackedIterator(random_dataset(6, 40), 8, source="data.train='x.json'")


@pytest.fixture(scope="module")
def soft_steps():
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    return train_step.SoftSteps(modeling.make_model(CFG), exits=(1, 2, 3), tx=optax.sgd(1.0),
                                mesh=mesh, rows_per_chunk=64)


def _step(steps, batch):
    """(metrics, gradient) of one SGD step with lr 1 from the same initial params."""
    state = steps.init_state(jax.random.PRNGKey(0))
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = steps.train_step(state, train_step.to_global_batch(batch,
                                                                        steps.batch_shardings))
    grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, state.params)
    return jax.device_get(metrics), grads


def test_packed_loss_and_gradients_equal_unpacked(soft_steps):
    ds = random_dataset(10, 48, seed=7)
    rows = pack_rows(ds.lengths, np.arange(len(ds)), ds.max_len)
    assert len(rows) < len(ds) - 1 and any(len(r) > 1 for r in rows)
    rows += [[]] * (len(ds) - len(rows))  # all-padding rows too; one batch shape for both
    packed = collate_packed(ds, rows)
    unpacked = collate(ds.tokens, ds.loss_masks, ds.max_len, ds.pad_id)
    m_p, g_p = _step(soft_steps, packed)
    m_u, g_u = _step(soft_steps, unpacked)
    assert np.isfinite(m_p["loss"])
    for k in m_u:
        if k.startswith(("loss", "accuracy", "grad_norm")):
            np.testing.assert_allclose(m_p[k], m_u[k], rtol=2e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_u), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    # without the segment ids the examples would see each other: the loss differs
    leaky = {k: v for k, v in packed.items() if k != "segment_ids"}
    m_l, _ = _step(soft_steps, leaky)
    assert abs(m_l["loss"] - m_u["loss"]) > 1e-3


def test_packing_fills_alpaca_rows(assets_dir):
    records = json.loads((assets_dir / "alpaca_en_demo.json").read_text())
    tok = SentencePieceTokenizer(assets_dir / "llama2_tokenizer.model")
    ds = tokenize_records(records, tok, 512)
    it = PackedIterator(ds, 8)
    rows = it.rows(0)
    fill = ds.lengths.sum() / (len(rows) * 512)
    assert fill > 0.9, fill
