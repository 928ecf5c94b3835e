"""The multi-exit cross-entropy kernel: chunked, gradient fused into the forward pass, sharded.

Every exit's loss is computed from (exit hidden states `[K, B, T, D]`, the final norm's scale,
the head kernel `[D, V]`) in row chunks, and its gradient in the same pass (`softmax - onehot`
is known as soon as a chunk's logits are): no `[K, B, T, V]` tensor, no recompute in backward
(each exit costs 6 x D x V FLOPs a token), residuals = the exits' hidden-state gradient and one
head gradient.

**Data parallel by construction.** The kernel runs under `shard_map` over the batch's mesh
axes: each device flattens *its own* rows (`[K, B/dp, T, D]` -> rows) and computes their logits
only, so per-device work and memory fall with the data-parallel degree; nothing batch-sized is
gathered. The row budget (`rows_per_chunk`) is counted per device and over all exits, and the
rows are cut into balanced chunks (the last chunk overlaps the previous one and masks the
overlap), so any sequence length works without degenerate chunks.

**Vocab parallel.** When the head's vocab axis is split over a mesh axis (`tensor`), each
device keeps its `[rows, V/tp]` logits: the logsumexp, the target logit and the row maximum are
reductions over that axis (`pmax`/`psum` of `[rows]` vectors), never a gather of
`[rows, V]`. The hidden-state gradient is a partial sum per vocab shard and is reduced once
after the loop (it is linear in the logits' gradient).

**Once per step.** Partial head and norm gradients stay per device through the loop and are
reduced once at the end (a reduce-scatter onto the kernel's fsdp shards where it has them).

**Anchored to a frozen teacher.** With a `Teacher` (its final hidden state `[B, T, D]`, final
norm and head), each chunk also computes the teacher's logits for its rows, beside the
student's, and adds a_k KL(p_teacher || p_k) per token: no `[B, T, V]` teacher logits are held,
and the teacher's rows are sharded like the student's.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec

from sorted_jax.model.layers import rms_norm

Array = jax.Array
P = PartitionSpec


@dataclasses.dataclass(frozen=True)
class RowChunks:
    """How one device walks its rows: `chunks` chunks of `rows` rows per exit."""

    rows: int
    chunks: int


def row_chunks(local_rows: int, num_exits: int, rows_per_chunk: int) -> RowChunks:
    """Balanced chunks with `num_exits * rows <= rows_per_chunk` (logits held at once).

    The chunk count is the fewest that fit the budget; rows are spread evenly over them, so at
    most `chunks - 1` rows are computed twice (the last chunk's overlap, masked).
    """
    if rows_per_chunk < num_exits:
        raise ValueError(f"loss_rows_per_chunk={rows_per_chunk} is smaller than the number of "
                         f"exits ({num_exits}): a chunk holds at least one row of every exit")
    local_rows = max(1, local_rows)
    cap = rows_per_chunk // num_exits
    chunks = -(-local_rows // cap)
    return RowChunks(rows=-(-local_rows // chunks), chunks=chunks)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen model's distribution on the same tokens, as the kernel reads it: its final
    hidden state (before its final norm), the norm's scale and its head kernel. `weights`
    `[K]`: a_k, the weight of KL(p_teacher || p_k) for each student exit (0 = not anchored)."""

    hidden: Array  # [B, T, D]
    norm_scale: Array  # [D]
    head_kernel: Array  # [D, V]
    weights: Array  # [K]


@dataclasses.dataclass(frozen=True)
class LossLayout:
    """Mesh axes the kernel splits over (static; empty = one device or no mesh in context)."""

    mesh: AbstractMesh | None = None
    batch_axes: tuple[str, ...] = ()  # the rows' batch axis
    vocab_axis: str | None = None  # the head kernel's vocab axis
    embed_axes: tuple[str, ...] = ()  # the head gradient is reduce-scattered over these

    @property
    def batch_spec(self) -> str | tuple[str, ...] | None:
        return _spec_entry(self.batch_axes)

    @property
    def data_parallel(self) -> int:
        return 1 if self.mesh is None else math.prod(self.mesh.shape[a] for a in self.batch_axes)


def _spec_entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _dividing(axes: tuple[str, ...], mesh: AbstractMesh, dim: int) -> tuple[str, ...]:
    """The prefix-greedy subset of `axes` (size > 1) whose product divides `dim`."""
    chosen: list[str] = []
    for a in axes:
        if mesh.shape[a] > 1 and dim % math.prod(mesh.shape[x] for x in [*chosen, a]) == 0:
            chosen.append(a)
    return tuple(chosen)


def resolve_layout(batch: int, dim: int, vocab: int,
                   rules_axes: dict[str, tuple[str, ...]]) -> LossLayout:
    """The layout for the mesh in context (`jax.set_mesh`), given logical -> mesh axes.

    rules_axes: the mesh axes of the logical names `batch`, `embed` and `vocab`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return LossLayout()
    present = set(mesh.axis_names)

    def axes_of(name: str) -> tuple[str, ...]:
        return tuple(a for a in rules_axes.get(name, ()) if a in present)

    batch_axes = _dividing(axes_of("batch"), mesh, batch)
    vocab_axes = [a for a in _dividing(axes_of("vocab"), mesh, vocab) if a not in batch_axes]
    embed_axes = tuple(a for a in _dividing(axes_of("embed"), mesh, dim) if a in batch_axes)
    if not batch_axes and not vocab_axes:
        return LossLayout()
    return LossLayout(mesh, batch_axes, vocab_axes[0] if vocab_axes else None, embed_axes)


# ---------------------------------------------------------------------------------------------
# Per-device kernel


@dataclasses.dataclass(frozen=True)
class _Static:
    layout: LossLayout
    chunking: RowChunks
    eps: float
    distill: bool = False  # also KL(last exit || exit k), detached teacher
    anchor: bool = False  # also KL(frozen teacher || exit k)


def _vocab_stats(logits: Array, targets: Array, offset: Array | int,
                 axis: str | None) -> tuple[Array, Array, Array]:
    """(logsumexp, target logit, target is a top-1) of `[rows, V_local]` logits, whole vocab.

    "Top-1" compares the target's logit with the row maximum the logsumexp needs anyway, so the
    accuracy metric costs no argmax pass over `[rows, V]` (a variadic reduce, slow on CPU) and no
    extra collective under a vocab split. A target tied with another maximal logit counts as a
    hit (`jnp.argmax` would pick the lower index); ties of float logits are rare.
    """
    v_local = logits.shape[-1]
    local_max = jnp.max(logits, axis=-1)
    top = local_max if axis is None else jax.lax.pmax(local_max, axis)
    sum_exp = jnp.sum(jnp.exp(logits - top[:, None]), axis=-1)
    local_t = targets - offset
    inside = (local_t >= 0) & (local_t < v_local)
    target_logit = jnp.take_along_axis(logits, jnp.clip(local_t, 0, v_local - 1)[:, None],
                                       axis=-1)[:, 0]
    target_logit = jnp.where(inside, target_logit, 0.0)
    if axis is not None:
        sum_exp = jax.lax.psum(sum_exp, axis)
        target_logit = jax.lax.psum(target_logit, axis)
    return top + jnp.log(sum_exp), target_logit, target_logit >= top


def _logsumexp(logits: Array, axis: str | None) -> Array:
    """Row logsumexp of `[rows, V_local]` logits over the whole (possibly split) vocab."""
    local_max = jnp.max(logits, axis=-1)
    top = local_max if axis is None else jax.lax.pmax(local_max, axis)
    sum_exp = jnp.sum(jnp.exp(logits - top[:, None]), axis=-1)
    if axis is not None:
        sum_exp = jax.lax.psum(sum_exp, axis)
    return top + jnp.log(sum_exp)


def _kl_from_teacher(t_logits: Array, logits: Array, lse: Array, axis: str | None
                     ) -> tuple[Array, Array]:
    """(KL(p_teacher || p_k) per exit and row `[K, c]`, p_teacher `[c, V_local]`).

    With teacher logits u, logsumexp r: KL_k = sum_v p_t u - r - sum_v p_t l_k + s_k.
    """
    t_lse = _logsumexp(t_logits, axis)
    p_t = jnp.exp(t_logits - t_lse[:, None])
    self_term = jnp.sum(p_t * t_logits, axis=-1)
    cross = jnp.einsum("cv,kcv->kc", p_t, logits)
    if axis is not None:
        self_term, cross = jax.lax.psum((self_term, cross), axis)
    return (self_term - t_lse)[None] - cross + lse, p_t


def _kl_to_last(logits: Array, lse: Array, axis: str | None) -> tuple[Array, Array]:
    """(KL(p_last || p_k) per exit and row `[K, c]`, p_last `[c, V_local]`).

    The deepest exit's distribution is the (detached) teacher: with logits l and logsumexps s,
    KL_k = sum_v p_last (l_last - l_k) - s_last + s_k, a reduction over the vocab (shards).
    """
    teacher = jax.lax.stop_gradient(jnp.exp(logits[-1] - lse[-1][:, None]))
    cross = jnp.einsum("cv,kcv->kc", teacher, logits)  # sum_v p_last l_k
    if axis is not None:
        cross = jax.lax.psum(cross, axis)
    return cross[-1][None] - cross - lse[-1][None] + lse, teacher


def _local_pass(h: Array, scale: Array, kernel: Array, targets: Array, mask: Array,
                weights: Array, distill: Array, t_h: Array, t_scale: Array, t_kernel: Array,
                anchor: Array, *, static: _Static, with_grad: bool) -> tuple[Array, ...]:
    """One device's rows: per-exit CE sums, hit counts, KL-to-the-last-exit sums, KL-from-the-
    teacher sums and (with_grad) the gradients.

    h `[K, b, T, D]`, targets / mask `[b, T]` are this device's batch rows; kernel
    `[D, V_local]` its vocab shard; distill `[K]` the KL weights (used when `static.distill`);
    t_h `[b, T, D]`, t_scale, t_kernel `[D, V_local]` the teacher's and anchor `[K]` its KL
    weights (used when `static.anchor`). Outputs are reduced over the mesh as `out_specs`
    expect.
    """
    layout, chunking, eps = static.layout, static.chunking, static.eps
    k, b, t, d = h.shape
    n, c = b * t, chunking.rows
    h = h.reshape(k, n, d)
    targets, mask = targets.reshape(n), mask.reshape(n)
    t_h = t_h.reshape(-1, t_h.shape[-1])  # [n, D] with a teacher, else a [1, 1] placeholder
    if n < c:  # fewer rows than one chunk (tiny shapes): pad once, cheaply
        h = jnp.pad(h, ((0, 0), (0, c - n), (0, 0)))
        targets, mask = jnp.pad(targets, (0, c - n)), jnp.pad(mask, (0, c - n))
        if static.anchor:
            t_h = jnp.pad(t_h, ((0, c - n), (0, 0)))
    total_rows = h.shape[1]
    v_axis = layout.vocab_axis
    offset = 0 if v_axis is None else jax.lax.axis_index(v_axis) * kernel.shape[1]
    w_kernel = kernel.astype(h.dtype)
    # shard_map's varying-axes types: per-exit sums vary over the batch axes, gradients also
    # over the vocab shards; loop carries start as zeros of those types.
    rows_vary = layout.batch_axes
    grad_vary = (*layout.batch_axes, *([v_axis] if v_axis else []))

    w_t_kernel = t_kernel.astype(t_h.dtype)

    def take(i: Array) -> tuple[Array, Array, Array, Array, Array]:
        start = jnp.minimum(i * c, total_rows - c)
        fresh = (start + jnp.arange(c)) >= i * c  # rows an earlier chunk has not counted
        t_hc = (jax.lax.dynamic_slice_in_dim(t_h, start, c) if static.anchor else t_h)
        return (start, jax.lax.dynamic_slice_in_dim(h, start, c, axis=1),
                jax.lax.dynamic_slice_in_dim(targets, start, c),
                jax.lax.dynamic_slice_in_dim(mask, start, c) * fresh, t_hc)

    def teacher_logits(t_hc: Array) -> Array:
        x_t = rms_norm(t_hc, t_scale, eps, t_hc.dtype)
        return jax.lax.stop_gradient(jnp.dot(x_t, w_t_kernel, preferred_element_type=jnp.float32))

    def stats(hc: Array, tc: Array, mc: Array, t_hc: Array):
        # The norm's vjp takes each vocab shard's partial d_x and must give per-device partial
        # d_scale (reduced once, after the loop), so its inputs are typed as varying over every
        # axis the gradients vary over (a type, not a copy; an invariant scale would make its
        # transpose all-reduce d_scale in every chunk).
        x, norm_vjp = jax.vjp(lambda hh, ss: rms_norm(hh, ss, eps, hh.dtype).reshape(-1, d),
                              _varying(hc, grad_vary[len(rows_vary):]),
                              _varying(scale, grad_vary))
        logits = jnp.dot(x, w_kernel, preferred_element_type=jnp.float32)  # [K*c, V_local]
        flat_t = jnp.tile(tc, k)
        lse, target_logit, top1 = _vocab_stats(logits, flat_t, offset, v_axis)
        ce = (lse - target_logit).reshape(k, c) * mc
        hit = top1.reshape(k, c) * mc
        kl, teacher = (_kl_to_last(logits.reshape(k, c, -1), lse.reshape(k, c), v_axis)
                       if static.distill else (jnp.zeros_like(ce), None))
        akl, p_t = (_kl_from_teacher(teacher_logits(t_hc), logits.reshape(k, c, -1),
                                     lse.reshape(k, c), v_axis)
                    if static.anchor else (jnp.zeros_like(ce), None))
        return (ce.sum(axis=1), hit.sum(axis=1), (kl * mc).sum(axis=1), (akl * mc).sum(axis=1),
                (logits, lse, flat_t, x, norm_vjp, teacher, p_t))

    zeros = _varying(jnp.zeros((k,), jnp.float32), rows_vary)
    if not with_grad:
        def body(i, carry):
            _, hc, tc, mc, t_hc = take(i)
            sums = stats(hc, tc, mc, t_hc)[:4]
            return tuple(acc + x for acc, x in zip(carry, sums, strict=True))

        sums = jax.lax.fori_loop(0, chunking.chunks, body, (zeros,) * 4)
        return tuple(_reduce(x, layout.batch_axes) for x in sums)

    def grad_body(i, carry):
        loss_acc, hit_acc, kl_acc, akl_acc, d_scale, d_kernel, d_h = carry
        start, hc, tc, mc, t_hc = take(i)
        loss, hit, kl, akl, (logits, lse, flat_t, x, norm_vjp, teacher, p_t) = stats(
            hc, tc, mc, t_hc)
        # d(sum_k w_k CE_k) / d logits = w_k * mask * (softmax - onehot), without a one-hot;
        # distillation adds lambda_k * mask * (softmax - teacher's softmax).
        row_weight = (weights[:, None] * mc[None]).reshape(-1, 1)
        vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) + offset
        probs = jnp.exp(logits - lse[:, None])
        d_logits = jnp.where(vocab_ids == flat_t[:, None], probs - 1.0, probs) * row_weight
        if static.distill:
            kl_weight = (distill[:, None] * mc[None]).reshape(k, c, 1)
            d_logits = d_logits + ((probs.reshape(k, c, -1) - teacher[None]) * kl_weight
                                   ).reshape(d_logits.shape)
        if static.anchor:  # a_k * mask * (softmax - the frozen teacher's softmax)
            a_weight = (anchor[:, None] * mc[None]).reshape(k, c, 1)
            d_logits = d_logits + ((probs.reshape(k, c, -1) - p_t[None]) * a_weight
                                   ).reshape(d_logits.shape)
        d_logits = d_logits.astype(x.dtype)
        d_x = jnp.dot(d_logits, w_kernel.T, preferred_element_type=jnp.float32).astype(x.dtype)
        d_kernel = d_kernel + jnp.dot(x.T, d_logits, preferred_element_type=jnp.float32)
        d_hc, d_s = norm_vjp(d_x)
        prev = jax.lax.dynamic_slice_in_dim(d_h, start, c, axis=1)  # non-zero only on overlap
        d_h = jax.lax.dynamic_update_slice_in_dim(d_h, prev + d_hc.astype(d_h.dtype), start,
                                                  axis=1)
        return (loss_acc + loss, hit_acc + hit, kl_acc + kl, akl_acc + akl,
                d_scale + d_s.astype(jnp.float32), d_kernel, d_h)

    grad_zeros = (_varying(jnp.zeros(x.shape, dtype), grad_vary) for x, dtype in (
        (scale, jnp.float32), (kernel, jnp.float32), (h, h.dtype)))
    init = (zeros, zeros, zeros, zeros, *grad_zeros)
    loss, hit, kl, akl, d_scale, d_kernel, d_h = jax.lax.fori_loop(0, chunking.chunks,
                                                                   grad_body, init)
    d_h = d_h[:, :n].reshape(k, b, t, d)
    if v_axis is not None:  # each vocab shard holds a partial sum: reduce once, not per chunk
        d_h = jax.lax.psum(d_h, v_axis)
    d_scale = _reduce(d_scale, (*layout.batch_axes, *([v_axis] if v_axis else [])))
    plain = tuple(a for a in layout.batch_axes if a not in layout.embed_axes)
    d_kernel = _reduce(d_kernel, plain)
    if layout.embed_axes:
        d_kernel = jax.lax.psum_scatter(d_kernel, layout.embed_axes, scatter_dimension=0,
                                        tiled=True)
    return (*(_reduce(x, layout.batch_axes) for x in (loss, hit, kl, akl)), d_h, d_scale,
            d_kernel)


def _varying(x: Array, axes: tuple[str, ...]) -> Array:
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def _reduce(x: Array, axes: tuple[str, ...]) -> Array:
    return jax.lax.psum(x, axes) if axes else x


def _program(static: _Static, with_grad: bool):
    """The per-device pass, under `shard_map` when the layout splits anything."""
    fn = functools.partial(_local_pass, static=static, with_grad=with_grad)
    layout = static.layout
    if layout.mesh is None:
        return fn
    rows, vocab = layout.batch_spec, layout.vocab_axis
    t_rows = P(rows) if static.anchor else P()  # no teacher: a replicated [1, 1] placeholder
    in_specs = (P(None, rows), P(), P(None, vocab), P(rows), P(rows), P(), P(), t_rows, P(),
                P(None, vocab) if static.anchor else P(), P())
    out_specs = (P(), P(), P(), P())
    if with_grad:
        out_specs += (P(None, rows), P(), P(_spec_entry(layout.embed_axes), vocab))
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(11,))
def _weighted_loss(h, scale, kernel, targets, mask, weights, distill, t_h, t_scale, t_kernel,
                   anchor, static):
    sums = _program(static, with_grad=False)(h, scale, kernel, targets, mask, weights, distill,
                                             t_h, t_scale, t_kernel, anchor)
    return (_total(sums, weights, distill, anchor), *sums)


def _total(sums, weights, distill, anchor):
    loss, _, kl, akl = sums
    return jnp.sum(loss * weights) + jnp.sum(kl * distill) + jnp.sum(akl * anchor)


def _weighted_loss_fwd(h, scale, kernel, targets, mask, weights, distill, t_h, t_scale,
                       t_kernel, anchor, static):
    *sums, d_h, d_scale, d_kernel = _program(static, with_grad=True)(
        h, scale, kernel, targets, mask, weights, distill, t_h, t_scale, t_kernel, anchor)
    out = (_total(sums, weights, distill, anchor), *sums)
    return out, (d_h, d_scale.astype(scale.dtype), d_kernel.astype(kernel.dtype))


def _weighted_loss_bwd(static, res, g):
    # Only the weighted total is differentiable; per-exit sums are metrics, the weights are
    # hyper-parameters and the teacher is frozen (no gradient).
    g_total = g[0]
    d_h, d_scale, d_kernel = ((g_total * r).astype(r.dtype) for r in res)
    return d_h, d_scale, d_kernel, None, None, None, None, None, None, None, None


_weighted_loss.defvjp(_weighted_loss_fwd, _weighted_loss_bwd)


def multi_exit_ce(hidden: Array, norm_scale: Array, head_kernel: Array, targets: Array,
                  loss_mask: Array, exit_weights: Array, *, eps: float, rows_per_chunk: int,
                  rules_axes: dict[str, tuple[str, ...]] | None = None,
                  distill_weights: Array | None = None, teacher: Teacher | None = None
                  ) -> tuple[Array, Array, Array, Array, Array]:
    """(total [differentiable], per-exit CE sums `[K]`, hit counts `[K]`, KL-to-last sums `[K]`,
    KL-from-teacher sums `[K]`).

    total = sum_k w_k CE_k + sum_k lambda_k KL(p_last || p_k) + sum_k a_k KL(p_teacher || p_k),
    each summed over tokens. hidden `[K, B, T, D]`: the exits' hidden states (not normed),
    deepest last; targets `[B, T]` int; loss_mask `[B, T]` float; distill_weights `[K]`
    (lambda; None = no self-distillation, its KL sums are then zero); teacher: a frozen model's
    final state, norm and head with the anchor weights a_k (None: no anchor, its sums zero).
    Sums over the global batch, whatever the mesh.
    """
    k, b, t, d = hidden.shape
    layout = resolve_layout(b, d, head_kernel.shape[1], rules_axes or {})
    chunking = row_chunks(b * t // layout.data_parallel, k, rows_per_chunk)
    distill = distill_weights is not None and k > 1
    lam = (jnp.zeros((k,), jnp.float32) if distill_weights is None
           else jnp.asarray(distill_weights, jnp.float32))
    if teacher is None:
        placeholder = jnp.zeros((1, 1), hidden.dtype)
        t_args = (placeholder, jnp.zeros((1,), jnp.float32), placeholder,
                  jnp.zeros((k,), jnp.float32))
    else:
        if teacher.head_kernel.shape[1] != head_kernel.shape[1]:
            raise ValueError(f"the teacher's vocab ({teacher.head_kernel.shape[1]}) is not the "
                             f"student's ({head_kernel.shape[1]})")
        sg = jax.lax.stop_gradient
        t_args = (sg(teacher.hidden), sg(teacher.norm_scale), sg(teacher.head_kernel),
                  jnp.asarray(teacher.weights, jnp.float32))
    return _weighted_loss(hidden, norm_scale, head_kernel, targets.astype(jnp.int32),
                          loss_mask.astype(jnp.float32), exit_weights.astype(jnp.float32), lam,
                          *t_args, _Static(layout, chunking, float(eps), distill,
                                           teacher is not None))
