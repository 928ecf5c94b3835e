"""The SoFT objective: mean over an exit set of each exit's token cross-entropy (paper Eq. 1).

Exit n reads the hidden state after layer n through the model's own final RMSNorm and shared
lm_head. A naive version materialises `[K, B, T, V]` logits; `multi_exit_losses` instead runs
the chunked, fused, data-parallel kernel of `sorted_jax.exit_loss`:

- no `[K, B, T, V]` tensor, only `rows_per_chunk` rows of logits per device at a time;
- no recompute in the backward pass: each exit costs 6 x D x V FLOPs a token (forward matmul,
  and the two gradient matmuls), not the 8 x of a checkpoint-and-recompute scheme;
- each device computes the logits of its own batch rows only (and, with a `tensor` axis, of its
  vocab shard only).

Sums, not means, come out (with token counts), so gradient accumulation adds micro-batches and
divides once. This module also owns exit sets, their weights and the per-exit metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax import sharding
from sorted_jax.errors import UserError
from sorted_jax.exit_loss import multi_exit_ce
from sorted_jax.modeling import rms_norm

Array = jax.Array


class ExitError(UserError):
    """An exit set that does not fit the model."""


def default_exits(num_layers: int) -> tuple[int, ...]:
    """The paper's exits: every 4th layer from 12 for 32/40-layer models; else ~L/8 spacing.

    LLaMA-2 7B (32 layers) -> (12, 16, ..., 32); 13B (40) -> (12, 16, ..., 40). Other depths
    get up to six exits spaced max(1, L // 8) apart, ending at L.
    """
    if num_layers >= 16 and (num_layers - 12) % 4 == 0:
        return tuple(range(12, num_layers + 1, 4))
    step = max(1, num_layers // 8)
    start = max(step, num_layers - 5 * step)
    return tuple(range(start, num_layers + 1, step))


def _parse_exits(exits: Sequence[int] | str | None, num_layers: int) -> list[int]:
    """Layer numbers in the order given (validated: in range, unique, not empty)."""
    if exits is None or exits == "default":
        return list(default_exits(num_layers))
    if isinstance(exits, str):
        text = exits.strip().lower()
        if text == "all":
            return list(range(1, num_layers + 1))
        if text in ("last", "sft"):
            return [num_layers]
        try:
            exits = [int(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError:
            raise ExitError(f"exits must be comma-separated layer numbers, got {text!r}") from None
    values = [int(e) for e in exits]
    if not values:
        raise ExitError("the exit set is empty: give at least one layer number, e.g. the last "
                        f"layer {num_layers} for plain SFT")
    bad = [e for e in values if not 1 <= e <= num_layers]
    if bad:
        raise ExitError(f"exit layers {bad} are out of range: exits are layer numbers 1.."
                        f"{num_layers} (exit n reads the hidden state after layer n)")
    if len(set(values)) != len(values):
        raise ExitError(f"exit layers repeat: {values}")
    return values


def resolve_exits(exits: Sequence[int] | str | None, num_layers: int) -> tuple[int, ...]:
    """Validate an exit set (layer numbers 1..L): unique and sorted on return.

    Accepts a sequence, a comma-separated string ("12,20,32"), "all", "last"/"sft", or None
    for the default. With per-exit weights, use `resolve_exit_set` (it sorts the pairs).
    """
    return tuple(sorted(_parse_exits(exits, num_layers)))


def resolve_exit_weights(weights: Sequence[float] | None, exits: Sequence[int]) -> np.ndarray:
    """Per-exit loss weights, one per exit in the order of `exits`; default uniform 1/|B|."""
    if weights is None or len(weights) == 0:
        return np.full(len(exits), 1.0 / len(exits), np.float32)
    w = np.asarray([float(x) for x in weights], np.float32)
    if w.shape != (len(exits),):
        raise ExitError(f"got {len(w)} exit weights for {len(exits)} exits {tuple(exits)}")
    if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ExitError(f"exit weights must be finite, non-negative and not all zero: {w}")
    return w


def resolve_exit_set(exits: Sequence[int] | str | None, weights: Sequence[float] | None,
                     num_layers: int) -> tuple[tuple[int, ...], np.ndarray]:
    """(sorted exits, their weights): weight i belongs to exit i *as given*, and stays with it.

    `exits=(32, 12), weights=(0.9, 0.1)` -> `((12, 32), [0.1, 0.9])`.
    """
    given = _parse_exits(exits, num_layers)
    w = resolve_exit_weights(weights, given)
    order = np.argsort(given, kind="stable")
    return tuple(given[i] for i in order), w[order]


@flax.struct.dataclass
class ExitSums:
    """Unnormalised per-exit sums over the tokens that count."""

    loss: Array  # [K] sum of token cross-entropies
    correct: Array  # [K] number of tokens whose argmax is the target
    tokens: Array  # [] number of tokens that count (sum of the loss mask)

    def __add__(self, other: ExitSums) -> ExitSums:
        return jax.tree.map(jnp.add, self, other)


def _rules_axes(rules: Sequence[tuple[str, Any]] | None) -> dict[str, tuple[str, ...]]:
    """Mesh axes of the logical names the loss needs, from `rules` or the rules in context."""
    if rules is None:
        rules = tuple(nn.get_logical_axis_rules()) or sharding.DEFAULT_RULES
    return {name: sharding.mesh_axes_of(name, tuple(rules)) for name in ("batch", "embed",
                                                                         "vocab")}


def multi_exit_losses(hidden_exits: Array, norm_scale: Array, head_kernel: Array,
                      targets: Array, loss_mask: Array, exit_weights: Array, *, eps: float,
                      rows_per_chunk: int = 4096,
                      rules: Sequence[tuple[str, Any]] | None = None
                      ) -> tuple[Array, ExitSums]:
    """Weighted CE sum over exits (differentiable) and per-exit sums (metrics).

    hidden_exits: `[K, B, T, D]` hidden states after the K exit layers (not normed), as
    `Llama(..., exits=...)` returns them; norm_scale `[D]`, head_kernel `[D, V]`: the model's
    final norm and lm_head (shared by all exits); targets `[B, T]` int, loss_mask `[B, T]`
    (1 where the token counts), exit_weights `[K]`. Divide the first output by
    `ExitSums.tokens` for the paper's loss. `rows_per_chunk` bounds the logits each device
    holds at once to `rows_per_chunk x V` floats, whatever the number of exits. Under a mesh
    (`jax.set_mesh`) the loss is data parallel (`sorted_jax.exit_loss`); `rules` (default: the
    flax rules in context) say which mesh axes hold the batch, embed and vocab axes.
    """
    mask = loss_mask.astype(jnp.float32)
    total, loss, correct = multi_exit_ce(
        hidden_exits, norm_scale, head_kernel, targets, mask,
        jnp.asarray(exit_weights, jnp.float32), eps=eps, rows_per_chunk=rows_per_chunk,
        rules_axes=_rules_axes(rules))
    sums = ExitSums(loss=jax.lax.stop_gradient(loss), correct=jax.lax.stop_gradient(correct),
                    tokens=jnp.sum(mask))
    return total, sums


def exit_losses(hidden: Array, exits: Sequence[int], norm_scale: Array, head_kernel: Array,
                targets: Array, loss_mask: Array, exit_weights: Array, *, eps: float,
                rows_per_chunk: int = 4096) -> tuple[Array, ExitSums]:
    """`multi_exit_losses` on the exits' rows of an every-layer stack `[L, B, T, D]`.

    For callers that hold every layer's state; training asks the model for the exits only.
    """
    return multi_exit_losses(select_exits(hidden, exits), norm_scale, head_kernel, targets,
                             loss_mask, exit_weights, eps=eps, rows_per_chunk=rows_per_chunk)


def select_exits(hidden: Array, exits: Sequence[int]) -> Array:
    """Rows of the `[L, B, T, D]` hidden-state stack that the exits read: `[K, B, T, D]`."""
    if list(exits) == list(range(exits[0], exits[0] + len(exits))):
        return hidden[exits[0] - 1:exits[-1]]  # contiguous: a slice, not a gather
    return hidden[np.asarray(exits) - 1]


def naive_exit_losses(hidden_exits: Array, norm_scale: Array, head_kernel: Array,
                      targets: Array, loss_mask: Array, exit_weights: Array, *,
                      eps: float) -> tuple[Array, ExitSums]:
    """Reference: all `[K, B, T, V]` logits at once. For tests and the memory comparison."""
    x = rms_norm(hidden_exits, norm_scale, eps, hidden_exits.dtype)
    logits = jnp.einsum("kbtd,dv->kbtv", x, head_kernel.astype(x.dtype),
                        preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    mask = loss_mask.astype(jnp.float32)
    ce = -jnp.take_along_axis(logp, targets[None, :, :, None].astype(jnp.int32), -1)[..., 0]
    loss = jnp.sum(ce * mask[None], axis=(1, 2))
    correct = jnp.sum((jnp.argmax(logits, -1) == targets[None]) * mask[None], axis=(1, 2))
    sums = ExitSums(loss=jax.lax.stop_gradient(loss),
                    correct=jax.lax.stop_gradient(correct.astype(jnp.float32)),
                    tokens=jnp.sum(mask))
    return jnp.sum(loss * jnp.asarray(exit_weights, jnp.float32)), sums


def exit_metrics(sums: ExitSums, exits: Sequence[int]) -> dict[str, Array]:
    """Per-exit mean loss and token accuracy, keyed `loss/exit_12`, `accuracy/exit_12`, ..."""
    n = jnp.maximum(sums.tokens, 1.0)
    out = {}
    for i, e in enumerate(exits):
        out[f"loss/exit_{e}"] = sums.loss[i] / n
        out[f"accuracy/exit_{e}"] = sums.correct[i] / n
    out["tokens"] = sums.tokens
    return out
