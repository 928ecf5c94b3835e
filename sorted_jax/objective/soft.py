"""The SoFT objective: mean over an exit set of each exit's token cross-entropy (paper Eq. 1).

Exit n reads the hidden state after layer n through the model's own final RMSNorm and shared
lm_head. A naive version materialises `[K, B, T, V]` logits; `multi_exit_losses` instead runs
the chunked, fused, data-parallel kernel of `sorted_jax.objective.exit_loss`:

- no `[K, B, T, V]` tensor, only `rows_per_chunk` rows of logits per device at a time;
- no recompute in the backward pass: each exit costs 6 x D x V FLOPs a token (forward matmul,
  and the two gradient matmuls), not the 8 x of a checkpoint-and-recompute scheme;
- each device computes the logits of its own batch rows only (and, with a `tensor` axis, of its
  vocab shard only).

Sums, not means, come out (with token counts), so gradient accumulation adds micro-batches and
divides once. This module also owns exit sets, their weights and the per-exit metrics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax.core.errors import UserError
from sorted_jax.model.layers import rms_norm
from sorted_jax.objective.exit_loss import Teacher, multi_exit_ce
from sorted_jax.parallel import sharding

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
        if text.startswith("from="):
            return _exits_from_fraction(text, num_layers)
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


def _exits_from_fraction(text: str, num_layers: int) -> list[int]:
    """`from=F[,step=S]`: every S-th layer from ceil(F x L) up to L, L always included.

    The default step is the paper's spacing, max(1, L // 8): `from=0.375` on 32 layers gives
    12, 16, ..., 32, on 40 layers 15, 20, ..., 40.
    """
    fields = dict(part.split("=", 1) for part in text.replace(" ", "").split(",") if "=" in part)
    try:
        frac = float(fields.get("from", ""))
        step = int(fields.get("step", max(1, num_layers // 8)))
    except ValueError:
        raise ExitError(f"exits {text!r}: use from=F (0 < F <= 1) and optionally step=S (a "
                        "whole number of layers), e.g. 'from=0.4' or 'from=0.4,step=2'") from None
    if not 0 < frac <= 1 or step < 1 or set(fields) - {"from", "step"}:
        raise ExitError(f"exits {text!r}: use from=F (0 < F <= 1) and optionally step=S >= 1")
    first = max(1, math.ceil(frac * num_layers - 1e-9))
    out = list(range(num_layers, first - 1, -step))[::-1]  # counted down from L: L included
    return out


def resolve_exits(exits: Sequence[int] | str | None, num_layers: int) -> tuple[int, ...]:
    """Validate an exit set (layer numbers 1..L): unique and sorted on return.

    Accepts a sequence, a comma-separated string ("12,20,32"), "all", "last"/"sft",
    "from=F[,step=S]" (by depth fraction), or None for the default. With per-exit weights,
    use `resolve_exit_set` (it sorts the pairs).
    """
    return tuple(sorted(_parse_exits(exits, num_layers)))


WEIGHT_SCHEMES = ("uniform", "last", "depth", "sqrt")


def weight_scheme(name: str, exits: Sequence[int]) -> np.ndarray:
    """Per-exit weights of a named scheme (sum 1), for exits in the order given.

    - `uniform`: 1/K each, the paper's mean (Eq. 1).
    - `last[:F]`: the deepest exit gets F (default 0.5), the others share 1 - F equally: the
      full model's loss counts as much as all sub-models together (at F = 0.5).
    - `depth`: proportional to the layer number: deeper exits, which carry the pretrained
      model's quality, weigh more; shallow exits still learn, more slowly.
    - `sqrt`: proportional to sqrt(layer number): between uniform and depth.
    """
    k = len(exits)
    head, _, arg = name.strip().lower().partition(":")
    e = np.asarray(exits, np.float64)
    if head == "uniform" and not arg:
        w = np.ones(k)
    elif head == "depth" and not arg:
        w = e
    elif head == "sqrt" and not arg:
        w = np.sqrt(e)
    elif head == "last":
        try:
            share = float(arg) if arg else 0.5
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise ExitError(f"exit weights {name!r}: last:F needs 0 < F <= 1, e.g. last:0.5")
        deepest = int(np.argmax(e))
        w = np.full(k, (1 - share) / max(k - 1, 1))
        w[deepest] = share if k > 1 else 1.0
    else:
        raise ExitError(f"unknown exit weight scheme {name!r}: use one of "
                        f"{', '.join(WEIGHT_SCHEMES)} (last:F for a share F), or one number "
                        "per exit")
    return (w / w.sum()).astype(np.float32)


def resolve_exit_weights(weights: Sequence[float] | str | None,
                         exits: Sequence[int]) -> np.ndarray:
    """Per-exit loss weights, one per exit in the order of `exits`.

    None / empty: the paper's uniform 1/|B|; a scheme name (`weight_scheme`); or explicit
    numbers, used as given (not normalised).
    """
    if weights is None or len(weights) == 0:
        return np.full(len(exits), 1.0 / len(exits), np.float32)
    if isinstance(weights, str):
        text = weights.strip()
        if text[:1].isalpha():
            return weight_scheme(text, exits)
        try:
            weights = [float(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError:
            raise ExitError(f"exit weights must be a scheme ({', '.join(WEIGHT_SCHEMES)}) or "
                            f"comma-separated numbers, got {text!r}") from None
    w = np.asarray([float(x) for x in weights], np.float32)
    if w.shape != (len(exits),):
        raise ExitError(f"got {len(w)} exit weights for {len(exits)} exits {tuple(exits)}")
    if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ExitError(f"exit weights must be finite, non-negative and not all zero: {w}")
    return w


def resolve_exit_set(exits: Sequence[int] | str | None,
                     weights: Sequence[float] | str | None,
                     num_layers: int) -> tuple[tuple[int, ...], np.ndarray]:
    """(sorted exits, their weights): weight i belongs to exit i *as given*, and stays with it.

    `exits=(32, 12), weights=(0.9, 0.1)` -> `((12, 32), [0.1, 0.9])`.
    """
    given = _parse_exits(exits, num_layers)
    w = resolve_exit_weights(weights, given)
    order = np.argsort(given, kind="stable")
    return tuple(given[i] for i in order), w[order]


@dataclasses.dataclass(frozen=True)
class ExitSchedule:
    """Exit weights as a function of the optimizer step: a curriculum from SFT to SoFT.

    Starts as SFT (the weights' whole sum on the deepest exit), keeps that for `hold_steps`,
    then moves linearly to `weights` over `ramp_steps` and stays there. With no hold and no ramp
    it is `weights` from step 0, the paper's recipe. Trades: a pretrained model's last layers
    first adapt to the new data undisturbed, at the price of fewer steps of training for the
    shallow exits.
    """

    weights: tuple[float, ...]  # the target, one per exit (deepest last)
    ramp_steps: int = 0
    hold_steps: int = 0

    def __post_init__(self) -> None:
        if self.ramp_steps < 0 or self.hold_steps < 0:
            raise ExitError(f"exit weight ramp/hold steps must be >= 0, got ramp "
                            f"{self.ramp_steps}, hold {self.hold_steps}")

    @property
    def constant(self) -> bool:
        return self.ramp_steps == 0 and self.hold_steps == 0

    def progress(self, step: Any, xp: Any = jnp) -> Any:
        """0 during the hold, rising linearly to 1 at hold + ramp steps."""
        step = xp.asarray(step, xp.float32)
        if self.ramp_steps == 0:
            return (step >= self.hold_steps).astype(xp.float32)
        return xp.clip((step - self.hold_steps) / self.ramp_steps, 0.0, 1.0)

    def at(self, step: Any, xp: Any = jnp) -> Any:
        """`[K]` weights at `step` (traced under jit with `xp=jnp`; `xp=np` on the host)."""
        target = xp.asarray(self.weights, xp.float32)
        if self.constant:
            return target
        start = xp.zeros_like(target)
        start = xp.where(xp.arange(len(self.weights)) == len(self.weights) - 1,
                         xp.sum(target), start)
        r = self.progress(step, xp)
        return (1.0 - r) * start + r * target


def distill_weights(num_exits: int, weight: float) -> np.ndarray | None:
    """lambda per exit for self-distillation toward the deepest exit (itself 0); None if off."""
    if weight < 0 or not np.isfinite(weight):
        raise ExitError(f"distill weight must be finite and >= 0, got {weight}")
    if weight == 0 or num_exits < 2:
        return None
    lam = np.full(num_exits, weight, np.float32)
    lam[-1] = 0.0
    return lam


@flax.struct.dataclass
class ExitSums:
    """Unnormalised per-exit sums over the tokens that count."""

    loss: Array  # [K] sum of token cross-entropies
    correct: Array  # [K] number of tokens whose argmax is the target
    tokens: Array  # [] number of tokens that count (sum of the loss mask)
    distill: Array | None = None  # [K] sum of KL(p_last || p_k) when self-distilling
    anchor: Array | None = None  # [K] sum of KL(p_teacher || p_k) when anchored

    @classmethod
    def zeros(cls, num_exits: int, distill: bool = False, anchor: bool = False) -> ExitSums:
        z = jnp.zeros((num_exits,), jnp.float32)
        return cls(z, z, jnp.zeros((), jnp.float32), z if distill else None,
                   z if anchor else None)

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
                      rules: Sequence[tuple[str, Any]] | None = None,
                      distill_weights: Array | None = None,
                      teacher: Teacher | None = None) -> tuple[Array, ExitSums]:
    """Weighted CE sum over exits (differentiable) and per-exit sums (metrics).

    hidden_exits: `[K, B, T, D]` hidden states after the K exit layers (not normed), as
    `Llama(..., exits=...)` returns them; norm_scale `[D]`, head_kernel `[D, V]`: the model's
    final norm and lm_head (shared by all exits); targets `[B, T]` int, loss_mask `[B, T]`
    (1 where the token counts), exit_weights `[K]`. Divide the first output by
    `ExitSums.tokens` for the paper's loss. `rows_per_chunk` bounds the logits each device
    holds at once to `rows_per_chunk x V` floats, whatever the number of exits. Under a mesh
    (`jax.set_mesh`) the loss is data parallel (`sorted_jax.objective.exit_loss`); `rules`
    (default: the flax rules in context) say which mesh axes hold the batch, embed and vocab axes.

    distill_weights `[K]` (lambda_k): also self-distil each exit toward the deepest exit's
    detached distribution, adding sum_k lambda_k KL(p_last || p_k) over tokens to the total
    (`ExitSums.distill` holds the per-exit KL sums).

    teacher: anchor the exits to a frozen model's distribution on the same tokens, adding
    sum_k a_k KL(p_teacher || p_k) (`Teacher.weights` are the a_k; `ExitSums.anchor` holds the
    per-exit KL sums). Its logits are computed chunk by chunk beside the student's.
    """
    mask = loss_mask.astype(jnp.float32)
    total, loss, correct, kl, akl = multi_exit_ce(
        hidden_exits, norm_scale, head_kernel, targets, mask,
        jnp.asarray(exit_weights, jnp.float32), eps=eps, rows_per_chunk=rows_per_chunk,
        rules_axes=_rules_axes(rules), distill_weights=distill_weights, teacher=teacher)
    sg = jax.lax.stop_gradient
    sums = ExitSums(loss=sg(loss), correct=sg(correct), tokens=jnp.sum(mask),
                    distill=None if distill_weights is None else sg(kl),
                    anchor=None if teacher is None else sg(akl))
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
                      eps: float, distill_weights: Array | None = None,
                      teacher: Teacher | None = None) -> tuple[Array, ExitSums]:
    """Reference: all `[K, B, T, V]` logits at once. For tests and the memory comparison."""
    x = rms_norm(hidden_exits, norm_scale, eps, hidden_exits.dtype)
    logits = jnp.einsum("kbtd,dv->kbtv", x, head_kernel.astype(x.dtype),
                        preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    mask = loss_mask.astype(jnp.float32)
    ce = -jnp.take_along_axis(logp, targets[None, :, :, None].astype(jnp.int32), -1)[..., 0]
    loss = jnp.sum(ce * mask[None], axis=(1, 2))
    correct = jnp.sum((jnp.argmax(logits, -1) == targets[None]) * mask[None], axis=(1, 2))
    total = jnp.sum(loss * jnp.asarray(exit_weights, jnp.float32))
    kl = None
    if distill_weights is not None:
        last = jax.lax.stop_gradient(logp[-1])
        kl_tok = jnp.sum(jnp.exp(last) * (last - logp), axis=-1)  # [K, B, T]
        kl = jnp.sum(kl_tok * mask[None], axis=(1, 2))
        total = total + jnp.sum(kl * jnp.asarray(distill_weights, jnp.float32))
    akl = None
    if teacher is not None:
        tx = rms_norm(teacher.hidden, teacher.norm_scale, eps, teacher.hidden.dtype)
        t_logp = jax.lax.stop_gradient(jax.nn.log_softmax(jnp.einsum(
            "btd,dv->btv", tx, teacher.head_kernel.astype(tx.dtype),
            preferred_element_type=jnp.float32), axis=-1))
        akl_tok = jnp.sum(jnp.exp(t_logp)[None] * (t_logp[None] - logp), axis=-1)  # [K, B, T]
        akl = jnp.sum(akl_tok * mask[None], axis=(1, 2))
        total = total + jnp.sum(akl * jnp.asarray(teacher.weights, jnp.float32))
    sg = jax.lax.stop_gradient
    sums = ExitSums(loss=sg(loss), correct=sg(correct.astype(jnp.float32)),
                    tokens=jnp.sum(mask), distill=None if kl is None else sg(kl),
                    anchor=None if akl is None else sg(akl))
    return total, sums


def exit_metrics(sums: ExitSums, exits: Sequence[int]) -> dict[str, Array]:
    """Per-exit mean loss and token accuracy, keyed `loss/exit_12`, `accuracy/exit_12`, ..."""
    n = jnp.maximum(sums.tokens, 1.0)
    out = {}
    for i, e in enumerate(exits):
        out[f"loss/exit_{e}"] = sums.loss[i] / n
        out[f"accuracy/exit_{e}"] = sums.correct[i] / n
        if sums.distill is not None:
            out[f"kl_to_last/exit_{e}"] = sums.distill[i] / n
        if sums.anchor is not None:
            out[f"kl_to_teacher/exit_{e}"] = sums.anchor[i] / n
    out["tokens"] = sums.tokens
    return out
