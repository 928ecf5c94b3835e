"""Tokenize records once, then batch them deterministically, resumably and per process.

Example layout. A record becomes ``tokens = [BOS] + prompt + response + [EOS]`` (BOS only if the
tokenizer wants one, `tokenizers.bos_prefix`) and a per-token ``loss_mask`` where
``loss_mask[t] = 1`` means token ``t`` is a target, predicted from ``tokens[:t]``: it is 1
exactly on the response tokens and the EOS. With the ``chat`` template, ``tokens`` is the
tokenizer's chat template applied to the conversation and the mask is 1 on every assistant
turn's content and end-of-turn token (`chat.encode_chat`).

Truncation policy. ``max_len`` bounds the number of tokens in a sequence (BOS and EOS included).
A longer sequence is cut from the right to ``max_len`` tokens: the prompt is kept whole and the
response loses its tail (and its EOS). A record whose prompt leaves no room for at least one
response token is dropped; ``TokenizedDataset.num_dropped`` counts them. A conversation is cut
the same way: it is dropped when no assistant token is left in its first ``max_len`` tokens.

Batch format (numpy, per process, right padding, ``T`` = the bucket length):

* ``input_ids``      int32   [B, T]  tokens, padded with the tokenizer's pad id;
* ``targets``        int32   [B, T]  ``targets[:, t] = input_ids[:, t + 1]`` (next token);
* ``loss_mask``      float32 [B, T]  aligned with ``targets``: 1 where ``targets[:, t]`` is a
  response token or the EOS, else 0;
* ``attention_mask`` int32   [B, T]  1 on real tokens, 0 on padding;
* ``positions``      int32   [B, T]  ``0 .. T-1``.

``T`` is the smallest bucket holding the longest sequence of the *global* batch, so every
process of a multi-host job builds arrays of the same shape and jit sees only a few shapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sorted_jax.core.errors import DataError
from sorted_jax.data.chat import (
    encode_chats,
    instruction_messages,
    is_chat_record,
    validate_messages,
)
from sorted_jax.data.records import Record, record_where
from sorted_jax.data.templates import CHAT, format_example
from sorted_jax.data.tokenizers import Tokenizer, bos_prefix

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "attention_mask", "positions")


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """``[tokenizer.encode(t) for t in texts]``, via the tokenizer's batch encoder if it has one
    (SentencePiece and HF tokenizers encode batches in parallel native code)."""
    batch_fn = getattr(tokenizer, "encode_batch", None)
    if batch_fn is not None:
        return batch_fn(list(texts))
    return [tokenizer.encode(t) for t in texts]


def _split_response(
    tokenizer: Tokenizer, prompt_ids: list[int], full_ids: list[int], response: str
) -> list[int]:
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids) :]
    return tokenizer.encode(response)


def encode_prompt_response(
    tokenizer: Tokenizer, prompt: str, response: str
) -> tuple[list[int], list[int]]:
    """Token ids of prompt and response, as the model sees them concatenated.

    SentencePiece encodes a string's first word with a leading-space piece, so the response is
    taken from the encoding of ``prompt + response`` (as generation continues after the prompt)
    whenever that encoding starts with the prompt's own ids; otherwise the two are encoded apart.
    """
    prompt_ids = tokenizer.encode(prompt)
    full_ids = tokenizer.encode(prompt + response)
    return prompt_ids, _split_response(tokenizer, prompt_ids, full_ids, response)


def _assemble(
    tokenizer: Tokenizer, prompt_ids: list[int], response_ids: list[int], max_len: int
) -> tuple[np.ndarray, np.ndarray, bool] | None:
    bos = bos_prefix(tokenizer)
    tokens = [*bos, *prompt_ids, *response_ids, tokenizer.eos_id]
    num_context = len(bos) + len(prompt_ids)
    if num_context >= max_len:  # no room for a single response token
        return None
    mask = np.zeros(len(tokens), dtype=bool)
    mask[num_context:] = True
    truncated = len(tokens) > max_len
    return np.asarray(tokens[:max_len], dtype=np.int32), mask[:max_len], truncated


def tokenize_example(
    tokenizer: Tokenizer, prompt: str, response: str, max_len: int
) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """``(tokens int32 [n], loss_mask bool [n], truncated)``, or None if the record is dropped."""
    prompt_ids, response_ids = encode_prompt_response(tokenizer, prompt, response)
    return _assemble(tokenizer, prompt_ids, response_ids, max_len)


@dataclass
class TokenizedDataset:
    """Tokenized examples held in memory (Alpaca's 52K records fit easily)."""

    tokens: list[np.ndarray]
    loss_masks: list[np.ndarray]
    pad_id: int
    max_len: int
    num_dropped: int = 0
    num_truncated: int = 0
    first_dropped: str | None = None  # where the first dropped record was read (or its index)
    lengths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = np.array([len(t) for t in self.tokens], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def stats(self) -> dict[str, int]:
        return {
            "num_examples": len(self),
            "num_dropped": self.num_dropped,
            "num_truncated": self.num_truncated,
            "num_target_tokens": int(sum(int(m.sum()) for m in self.loss_masks)),
        }


def tokenize_records(
    records: Sequence[Mapping[str, str]] | Sequence[Record],
    tokenizer: Tokenizer,
    max_len: int,
    template: str = "alpaca",
    chunk_size: int = 4096,
) -> TokenizedDataset:
    """Format each record with ``template`` and tokenize it (truncation: see the module doc)."""
    if max_len < 2:
        raise DataError(f"max_len must be >= 2, got {max_len}")
    if template == CHAT:
        return _tokenize_chat(records, tokenizer, max_len, chunk_size)
    for i, record in enumerate(records):
        if is_chat_record(record):
            raise DataError(f"{_where(records, i)} is a chat record (messages): it needs "
                            f"template 'chat', not {template!r}")
    tokens, masks, dropped, truncated = [], [], 0, 0
    first: str | None = None
    pairs = [format_example(record, template) for record in records]
    for start in range(0, len(pairs), chunk_size):
        chunk = pairs[start : start + chunk_size]
        prompt_ids = encode_batch(tokenizer, [p for p, _ in chunk])
        full_ids = encode_batch(tokenizer, [p + r for p, r in chunk])
        for j, ((_, response), p_ids, f_ids) in enumerate(
                zip(chunk, prompt_ids, full_ids, strict=True)):
            r_ids = _split_response(tokenizer, p_ids, f_ids, response)
            out = _assemble(tokenizer, p_ids, r_ids, max_len)
            if out is None:
                dropped += 1
                first = first or _where(records, start + j)
                continue
            toks, mask, was_truncated = out
            tokens.append(toks)
            masks.append(mask)
            truncated += was_truncated
    return TokenizedDataset(tokens, masks, tokenizer.pad_id, max_len, dropped, truncated, first)


def _where(records: Sequence[Any], i: int) -> str:
    """Where record `i` was read ("FILE:LINE: record N"), else its index."""
    return record_where(records[i]) or f"record {i}"


def _tokenize_chat(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, max_len: int,
                   chunk_size: int) -> TokenizedDataset:
    """`tokenize_records` with the tokenizer's chat template: a chat record's conversation,
    or an instruction record as one user turn and one assistant turn."""
    convs = [validate_messages(r, f"record {i}") if is_chat_record(r) else instruction_messages(
        r["instruction"], r.get("input", ""), r["output"]) for i, r in enumerate(records)]
    tokens, masks, dropped, truncated = [], [], 0, 0
    first: str | None = None
    for start in range(0, len(convs), chunk_size):
        chats = encode_chats(tokenizer, convs[start:start + chunk_size], start)
        for j, (ids, mask) in enumerate(chats):
            if not mask[1:max_len].any():  # no assistant token left within max_len
                dropped += 1
                first = first or _where(records, start + j)
                continue
            tokens.append(ids[:max_len])
            masks.append(mask[:max_len])
            truncated += len(ids) > max_len
    return TokenizedDataset(tokens, masks, tokenizer.pad_id, max_len, dropped, truncated, first)


def default_buckets(max_len: int, min_len: int = 32) -> list[int]:
    """Powers of two from ``min_len`` below ``max_len``, then ``max_len`` itself."""
    buckets, b = [], min_len
    while b < max_len:
        buckets.append(b)
        b *= 2
    return [*buckets, max_len]


def choose_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``."""
    for b in buckets:
        if b >= length:
            return b
    raise DataError(f"sequence of {length} tokens exceeds the largest bucket {buckets[-1]}")


def _check_buckets(buckets: Sequence[int] | None, max_len: int) -> list[int]:
    if buckets is None:
        return default_buckets(max_len)
    buckets = sorted(int(b) for b in buckets)
    if not buckets or buckets[0] < 2 or buckets[-1] < max_len:
        raise DataError(f"buckets {buckets} must be >= 2 and reach max_len={max_len}")
    return buckets


def collate(
    tokens: Sequence[np.ndarray],
    loss_masks: Sequence[np.ndarray],
    seq_len: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Right-pad examples to ``seq_len`` and build the batch dict (see the module docstring)."""
    b = len(tokens)
    input_ids = np.full((b, seq_len), pad_id, dtype=np.int32)
    targets = np.full((b, seq_len), pad_id, dtype=np.int32)
    loss_mask = np.zeros((b, seq_len), dtype=np.float32)
    attention_mask = np.zeros((b, seq_len), dtype=np.int32)
    for i, (toks, mask) in enumerate(zip(tokens, loss_masks, strict=True)):
        n = len(toks)
        if n > seq_len:
            raise ValueError(f"example of {n} tokens does not fit seq_len={seq_len}")
        input_ids[i, :n] = toks
        targets[i, : n - 1] = toks[1:]
        loss_mask[i, : n - 1] = mask[1:]
        attention_mask[i, :n] = 1
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (b, seq_len)).copy()
    return {
        "input_ids": input_ids,
        "targets": targets,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "positions": positions,
    }


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise DataError(
            f"global batch size {global_batch_size} must be a positive multiple of the "
            f"process count {process_count}"
        )
    return global_batch_size // process_count


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} not in [0, {process_count})")


def _global_to_local(
    dataset: TokenizedDataset,
    indices: np.ndarray,
    valid: np.ndarray,
    buckets: Sequence[int],
    process_index: int,
    process_count: int,
) -> dict[str, np.ndarray]:
    """This process's slice of the global batch ``indices``; rows with ``valid=False`` get a
    zero loss mask. The bucket comes from the whole global batch."""
    seq_len = choose_bucket(int(dataset.lengths[indices].max()), buckets)
    local = local_batch_size(len(indices), process_count)
    sl = slice(process_index * local, (process_index + 1) * local)
    toks = [dataset.tokens[i] for i in indices[sl]]
    masks = [
        dataset.loss_masks[i] if ok else np.zeros_like(dataset.loss_masks[i])
        for i, ok in zip(indices[sl], valid[sl], strict=True)
    ]
    return collate(toks, masks, seq_len, dataset.pad_id)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches per epoch (the training iterator drops the remainder)."""
    steps = num_examples // global_batch_size
    if steps == 0:
        raise DataError(
            f"{num_examples} examples cannot fill one global batch of {global_batch_size}"
        )
    return steps


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of ``epoch``: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


class DataIterator:
    """Endless training batches: epoch after epoch, each a fresh (seed, epoch) shuffle.

    The position ``(epoch, index)`` -- ``index`` = examples of the epoch already consumed, a
    multiple of the global batch size -- is all the state; :meth:`state_dict` gives it as plain
    ints (JSON-safe), and :meth:`load_state_dict` resumes the identical stream. Every process
    holds the same position and yields its own ``global_batch_size / process_count`` rows.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        buckets: Sequence[int] | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        _check_process(process_index, process_count)
        self.local_batch_size = local_batch_size(global_batch_size, process_count)
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.buckets = _check_buckets(buckets, dataset.max_len)
        self.process_index = process_index
        self.process_count = process_count
        self.steps_per_epoch = steps_per_epoch(len(dataset), global_batch_size)
        self.epoch = 0
        self.index = 0
        self._perm_epoch: int | None = None
        self._perm = np.arange(len(dataset))

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        if self._perm_epoch != epoch:
            self._perm = epoch_permutation(len(self.dataset), self.seed, epoch)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """Dataset indices of global batch ``step`` (0-based) of ``epoch``."""
        g = self.global_batch_size
        return self._order(epoch)[step * g : (step + 1) * g]

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index + self.global_batch_size > len(self.dataset):
            self.epoch, self.index = self.epoch + 1, 0
        indices = self.global_indices(self.epoch, self.index // self.global_batch_size)
        self.index += self.global_batch_size
        valid = np.ones(len(indices), dtype=bool)
        return _global_to_local(
            self.dataset, indices, valid, self.buckets, self.process_index, self.process_count
        )

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_examples": len(self.dataset),
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at a saved position; refuses a state from a different data stream."""
        if "packed_max_len" in state:
            raise DataError("data state is a packed stream's (data.packing=True) but this "
                            "iterator is unpacked: resuming would not continue the same stream")
        for key, mine in (
            ("seed", self.seed),
            ("num_examples", len(self.dataset)),
            ("global_batch_size", self.global_batch_size),
        ):
            if key in state and int(state[key]) != mine:
                raise DataError(
                    f"data state has {key}={int(state[key])} but this iterator has {mine}: "
                    "resuming would not continue the same stream"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or index < 0 or index % self.global_batch_size:
            raise DataError(f"invalid data position epoch={epoch} index={index}")
        self.epoch, self.index = epoch, index


class EvalIterator:
    """One in-order pass over a held-out set; each ``iter()`` starts a new pass.

    The last global batch is filled up with copies of its first example whose loss mask is all
    zero (real rows always have at least one target), so no example is dropped and every batch
    has the same number of rows. A row is real iff ``batch["loss_mask"][row].any()``.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        global_batch_size: int,
        *,
        buckets: Sequence[int] | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        _check_process(process_index, process_count)
        local_batch_size(global_batch_size, process_count)
        if len(dataset) == 0:
            raise DataError("empty eval dataset")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.buckets = _check_buckets(buckets, dataset.max_len)
        self.process_index = process_index
        self.process_count = process_count

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.global_batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        n, g = len(self.dataset), self.global_batch_size
        for start in range(0, n, g):
            real = np.arange(start, min(start + g, n))
            indices = np.concatenate([real, np.full(g - len(real), start)])
            valid = np.arange(g) < len(real)
            yield _global_to_local(
                self.dataset, indices, valid, self.buckets, self.process_index, self.process_count
            )
