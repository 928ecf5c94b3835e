"""The SoFT objective: mean over an exit set of each exit's token cross-entropy (paper Eq. 1).

Exit n reads the hidden state after layer n through the model's own final RMSNorm and shared
lm_head. A naive version materialises `[K, B, T, V]` logits; here every exit's loss is computed
from (hidden, norm scale, head kernel) in token chunks, and its gradient is computed in the same
pass (`softmax - onehot` is known as soon as a chunk's logits are), so:

- no `[K, B, T, V]` tensor, only one `[K, B, chunk, V]` chunk at a time;
- no recompute in the backward pass: each exit costs 6 x D x V FLOPs a token (forward matmul,
  and the two gradient matmuls), not the 8 x of a checkpoint-and-recompute scheme;
- the residuals kept for the backward pass are the gradient w.r.t. the exits' hidden states
  (the size of the hidden states themselves) and one `[D, V]` head gradient.

Sums, not means, come out (with token counts), so gradient accumulation adds micro-batches and
divides once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax.errors import UserError
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


def pick_chunk_len(seq_len: int, rows_per_chunk: int, num_exits: int, batch: int) -> int:
    """The largest divisor of seq_len with num_exits * batch * chunk <= rows_per_chunk.

    Budgeting rows over all exits keeps the chunk's `[K, B, C, V]` logits the same size
    whatever K is: adding exits adds loop iterations, not memory.
    """
    target = max(1, rows_per_chunk // max(1, num_exits * batch))
    best = 1
    for c in range(1, min(seq_len, target) + 1):
        if seq_len % c == 0:
            best = c
    return best


def _chunk(x: Array, axis: int, i: Array, size: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _exit_chunk(hidden: Array, exits: tuple[int, ...], i: Array, size: int) -> Array:
    """`[K, B, size, D]`: chunk i of every exit's hidden state, sliced from the `[L, ...]` stack."""
    return jnp.stack([_chunk(hidden[e - 1], 1, i, size) for e in exits])


def _chunk_stats(h, scale, kernel, targets, mask, eps):
    """Normed exits -> logits -> per-exit CE sums and correct counts, on flat rows.

    h `[K, B, C, D]` is flattened to `[K*B*C, D]` rows so every matmul is a plain 2-D one
    (no layout copies of the `[rows, V]` logits). Returns per-exit sums plus what the fused
    gradient needs: fp32 logits, their logsumexp, the normed rows and the norm's vjp.
    """
    k = h.shape[0]

    def norm(hh, ss):
        return rms_norm(hh, ss, eps, hh.dtype).reshape(-1, hh.shape[-1])

    x, norm_vjp = jax.vjp(norm, h, scale)
    logits = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    flat_targets = jnp.broadcast_to(targets[None], (k, *targets.shape)).reshape(-1)
    target_logit = jnp.take_along_axis(logits, flat_targets[:, None], axis=-1)[:, 0]
    flat_mask = jnp.broadcast_to(mask[None], (k, *mask.shape)).reshape(k, -1)
    ce = (lse - target_logit).reshape(k, -1) * flat_mask
    hit = (jnp.argmax(logits, axis=-1) == flat_targets).reshape(k, -1) * flat_mask
    return ce.sum(axis=1), hit.sum(axis=1), (logits, lse, flat_targets, x, norm_vjp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _exit_loss(hidden, scale, kernel, targets, mask, exit_weights, exits, eps, chunk):
    """(sum_k w_k * CE_k, per-exit CE sums, correct counts); hidden is the `[L, B, T, D]` stack."""
    def body(i, carry):
        h = _exit_chunk(hidden, exits, i, chunk)
        loss, correct, *_ = _chunk_stats(h, scale, kernel, _chunk(targets, 1, i, chunk),
                                         _chunk(mask, 1, i, chunk), eps)
        return carry[0] + loss, carry[1] + correct

    zeros = jnp.zeros(len(exits), jnp.float32)
    loss, correct = jax.lax.fori_loop(0, hidden.shape[2] // chunk, body, (zeros, zeros))
    return jnp.sum(loss * exit_weights), loss, correct


def _exit_loss_fwd(hidden, scale, kernel, targets, mask, exit_weights, exits, eps, chunk):
    """Loss and its gradient in one pass over the chunks (no recompute in backward).

    The hidden-state gradient is written chunk by chunk into an `[L, B, T, D]` buffer (zero at
    non-exit layers): the cotangent the layer scan needs anyway, so no `[K, ...]` copies.
    """
    def body(i, carry):
        loss_acc, correct_acc, d_scale, d_kernel, d_hidden = carry
        h = _exit_chunk(hidden, exits, i, chunk)
        tc, mc = _chunk(targets, 1, i, chunk), _chunk(mask, 1, i, chunk)
        loss, correct, (logits, lse, flat_t, x, norm_vjp) = _chunk_stats(
            h, scale, kernel, tc, mc, eps)
        # d(sum_k w_k CE_k) / d logits = w_k * mask * (softmax - onehot), without a one-hot.
        row_weight = (mc[None] * exit_weights[:, None, None]).reshape(-1, 1)
        vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        probs = jnp.exp(logits - lse[:, None])
        d_logits = (jnp.where(vocab == flat_t[:, None], probs - 1.0, probs)
                    * row_weight).astype(x.dtype)
        d_x = jnp.dot(d_logits, kernel.astype(x.dtype).T,
                      preferred_element_type=jnp.float32).astype(x.dtype)
        d_kernel = d_kernel + jnp.dot(x.T, d_logits, preferred_element_type=jnp.float32)
        d_h, d_s = norm_vjp(d_x)
        for k, e in enumerate(exits):
            d_hidden = jax.lax.dynamic_update_slice(
                d_hidden, d_h[k][None].astype(d_hidden.dtype), (e - 1, 0, i * chunk, 0))
        return (loss_acc + loss, correct_acc + correct, d_scale + d_s.astype(jnp.float32),
                d_kernel, d_hidden)

    zeros = jnp.zeros(len(exits), jnp.float32)
    init = (zeros, zeros, jnp.zeros(scale.shape, jnp.float32),
            jnp.zeros(kernel.shape, jnp.float32), jnp.zeros_like(hidden))
    loss, correct, d_scale, d_kernel, d_hidden = jax.lax.fori_loop(
        0, hidden.shape[2] // chunk, body, init)
    out = (jnp.sum(loss * exit_weights), loss, correct)
    return out, (d_hidden, d_scale.astype(scale.dtype), d_kernel.astype(kernel.dtype))


def _exit_loss_bwd(exits, eps, chunk, res, g):
    # Only the weighted total is differentiable; per-exit sums are metrics (see `exit_losses`).
    g_total = g[0]
    d_hidden, d_scale, d_kernel = ((g_total * r).astype(r.dtype) for r in res)
    return d_hidden, d_scale, d_kernel, None, None, None


_exit_loss.defvjp(_exit_loss_fwd, _exit_loss_bwd)


def exit_losses(hidden: Array, exits: Sequence[int], norm_scale: Array, head_kernel: Array,
                targets: Array, loss_mask: Array, exit_weights: Array, *, eps: float,
                rows_per_chunk: int = 4096) -> tuple[Array, ExitSums]:
    """Weighted CE sum over exits (differentiable) and per-exit sums (metrics).

    hidden: `[L, B, T, D]` hidden states after every layer (not normed), as the model returns
    them; exits: layer numbers (static); norm_scale `[D]`, head_kernel `[D, V]`: the model's
    final norm and lm_head (shared by all exits); targets `[B, T]` int, loss_mask `[B, T]`
    (1 where the token counts), exit_weights `[K]`. Divide the first output by
    `ExitSums.tokens` for the paper's loss. `rows_per_chunk` bounds the logits held at once to
    `rows_per_chunk x V` floats, whatever the number of exits.
    """
    exits = tuple(int(e) for e in exits)
    _, b, t, _ = hidden.shape
    chunk = pick_chunk_len(t, rows_per_chunk, len(exits), b)
    mask = loss_mask.astype(jnp.float32)
    total, loss, correct = _exit_loss(hidden, norm_scale, head_kernel, targets.astype(jnp.int32),
                                      mask, jnp.asarray(exit_weights, jnp.float32), exits, eps,
                                      chunk)
    sums = ExitSums(loss=jax.lax.stop_gradient(loss), correct=jax.lax.stop_gradient(correct),
                    tokens=jnp.sum(mask))
    return total, sums


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
