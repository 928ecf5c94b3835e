"""Packing: several examples per ``max_len`` row, each with its own positions and segment id.

Short examples (Alpaca's responses) leave most of a bucketed batch as padding; a packed row
holds as many examples as fit, so the step computes real tokens instead. Each example keeps
``positions`` 0, 1, ... of its own and a ``segment_ids`` value (1, 2, ... within its row; 0 on
padding): the model's packed-segment mask lets a token attend only to earlier tokens of its own
example, so a packed example's loss and gradient equal those of the same example alone.

Rows of an epoch: the epoch's example order (the same (seed, epoch) shuffle as the unpacked
stream), placed first-fit into the open rows of a window of ``window`` rows; when the window is
full its oldest row is emitted. Deterministic: a function of (seed, epoch, lengths, max_len)
only, so a resumed run rebuilds the same rows. The last rows of an epoch that do not fill a
global batch are dropped (as the unpacked stream drops its remainder examples).

Batch format: `pipeline.collate`'s keys, all ``[B, max_len]``, plus ``segment_ids`` int32; the
targets and loss mask never cross an example boundary (the last token of an example has no
target). Evaluation stays unpacked (`pipeline.EvalIterator`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sorted_jax.core.errors import DataError
from sorted_jax.data.pipeline import (
    TokenizedDataset,
    epoch_permutation,
    local_batch_size,
)

__all__ = ["PACKED_BATCH_KEYS", "PackedIterator", "collate_packed", "pack_rows"]

PACKED_BATCH_KEYS = ("input_ids", "targets", "loss_mask", "attention_mask", "positions",
                     "segment_ids")
DEFAULT_WINDOW = 64


def pack_rows(lengths: np.ndarray, order: np.ndarray, max_len: int,
              window: int = DEFAULT_WINDOW) -> list[list[int]]:
    """Example indices of each row: `order` placed first-fit into a window of open rows."""
    if window < 1:
        raise DataError(f"packing window must be >= 1, got {window}")
    rows: list[list[int]] = []
    open_rows: list[list[int]] = []
    room = np.zeros(0, np.int64)
    for i in order:
        n = int(lengths[i])
        if n > max_len:
            raise DataError(f"example {int(i)} has {n} tokens, more than max_len={max_len}")
        fits = np.flatnonzero(room >= n)
        if len(fits):
            j = int(fits[0])
            open_rows[j].append(int(i))
            room[j] -= n
            continue
        if len(open_rows) == window:  # emit the oldest row
            rows.append(open_rows.pop(0))
            room = room[1:]
        open_rows.append([int(i)])
        room = np.append(room, max_len - n)
    return rows + open_rows


def collate_packed(dataset: TokenizedDataset, rows: Sequence[Sequence[int]],
                   valid: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
    """The batch of packed `rows` (each a list of example indices), ``[len(rows), max_len]``.

    A row with ``valid=False`` keeps its tokens but gets a zero loss mask."""
    b, t = len(rows), dataset.max_len
    out = {
        "input_ids": np.full((b, t), dataset.pad_id, np.int32),
        "targets": np.full((b, t), dataset.pad_id, np.int32),
        "loss_mask": np.zeros((b, t), np.float32),
        "attention_mask": np.zeros((b, t), np.int32),
        "positions": np.zeros((b, t), np.int32),
        "segment_ids": np.zeros((b, t), np.int32),
    }
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row, start=1):
            toks, mask = dataset.tokens[i], dataset.loss_masks[i]
            n = len(toks)
            if at + n > t:
                raise ValueError(f"row {r} holds {at + n} tokens, more than max_len={t}")
            sl = slice(at, at + n)
            out["input_ids"][r, sl] = toks
            out["targets"][r, at:at + n - 1] = toks[1:]
            if valid is None or valid[r]:
                out["loss_mask"][r, at:at + n - 1] = mask[1:]
            out["attention_mask"][r, sl] = 1
            out["positions"][r, sl] = np.arange(n, dtype=np.int32)
            out["segment_ids"][r, sl] = seg
            at += n
    return out


class PackedIterator:
    """Endless packed training batches, epoch after epoch (`DataIterator`'s interface).

    The position ``(epoch, index)`` -- ``index`` = rows of the epoch already consumed, a
    multiple of the global batch size -- is all the state (`state_dict`, `load_state_dict`).
    Every process builds the same rows and yields its own ``global_batch_size /
    process_count`` of each global batch. ``steps_per_epoch`` is epoch 0's (each epoch packs
    its own shuffle, so later epochs may have a step more or less).
    """

    def __init__(self, dataset: TokenizedDataset, global_batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                 window: int = DEFAULT_WINDOW, source: str = "the data"):
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} not in [0, {process_count})")
        self.local_batch_size = local_batch_size(global_batch_size, process_count)
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed, self.shuffle, self.window = int(seed), shuffle, int(window)
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.index = 0, 0
        self._rows_epoch: int | None = None
        self._rows: list[list[int]] = []
        rows = len(self.rows(0))
        self.steps_per_epoch = rows // global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{source} cannot be packed into one global batch: its {len(dataset)} examples "
                f"pack into {rows} rows of max_len={dataset.max_len} tokens, fewer than the "
                f"global batch of {global_batch_size} rows; use a smaller batch_size or "
                "data.packing=False")

    def rows(self, epoch: int) -> list[list[int]]:
        """Example indices of each packed row of `epoch`."""
        if self._rows_epoch != epoch:
            n = len(self.dataset)
            order = epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
            self._rows = pack_rows(self.dataset.lengths, order, self.dataset.max_len,
                                   self.window)
            self._rows_epoch = epoch
        return self._rows

    def __iter__(self) -> PackedIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        g = self.global_batch_size
        if self.index + g > len(self.rows(self.epoch)):
            self.epoch, self.index = self.epoch + 1, 0
        rows = self.rows(self.epoch)[self.index:self.index + g]
        self.index += g
        local = self.local_batch_size
        mine = rows[self.process_index * local:(self.process_index + 1) * local]
        return collate_packed(self.dataset, mine)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "num_examples": len(self.dataset), "global_batch_size": self.global_batch_size,
                "packed_max_len": self.dataset.max_len}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at a saved position; refuses a state from a different (or unpacked) stream."""
        if "packed_max_len" not in state:
            raise DataError("data state is an unpacked stream's (data.packing=False) but this "
                            "iterator packs: resuming would not continue the same stream")
        for key, mine in (("seed", self.seed), ("num_examples", len(self.dataset)),
                          ("global_batch_size", self.global_batch_size),
                          ("packed_max_len", self.dataset.max_len)):
            if int(state.get(key, -1)) != mine:
                raise DataError(f"data state has {key}={state.get(key)} but this packed "
                                f"iterator has {mine}: resuming would not continue the same stream")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or index < 0 or index % self.global_batch_size:
            raise DataError(f"invalid data position epoch={epoch} index={index}")
        self.epoch, self.index = epoch, index
