"""The sharded, jitted SoFT train and eval steps.

One `jax.jit` per step with explicit in/out shardings and donated state. Gradient accumulation
is a `lax.scan` over micro-batches that adds unnormalised loss sums, gradients and token
counts, and divides once, so A micro-batches give exactly the step on the whole batch.
SFT is the same code with the exit set {L}.

Two ways to keep the full model where SFT would take it: `trainable_keys` trains only part of
the params (e.g. exit adapters on a frozen trunk: the gradient is taken with respect to those
params only, so the trunk's is never computed, and the optimizer holds state for them only);
`teacher` anchors the exits to a frozen model's distribution (its forward pass runs inside
the step on the same batch; its params are a step argument, never in the optimizer or the
checkpoint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sorted_jax.model.exit_adapters import apply_adapters
from sorted_jax.model.modeling import Llama, abstract_params, head_weights, with_exit_adapters
from sorted_jax.objective import soft
from sorted_jax.objective.exit_loss import Teacher
from sorted_jax.parallel import sharding

Array = jax.Array
Batch = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any


def make_optimizer(*, lr: float, total_steps: int, warmup_steps: int = 0,
                   schedule: str = "cosine", end_lr_ratio: float = 0.0,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, clip_norm: float | None = 1.0,
                   mu_dtype: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup then cosine (or constant/linear) decay, global-norm clipping."""
    if lr <= 0 or total_steps <= 0:
        raise ValueError(f"need lr > 0 and total_steps > 0, got lr={lr}, steps={total_steps}")
    warmup_steps = min(max(0, int(warmup_steps)), total_steps)
    decay_steps = max(1, total_steps - warmup_steps)
    end = lr * end_lr_ratio
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr_ratio)
    elif schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}: use cosine, linear or constant")
    sched = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps]
    ) if warmup_steps else decay
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mu_dtype=mu_dtype))
    return optax.chain(*parts), sched


class MasterWeightsState(NamedTuple):
    """fp32 copy of low-precision params, and the wrapped optimizer's state (over the copy)."""

    master: Any
    inner: Any


def with_fp32_master(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run `tx` on an fp32 master copy of (bf16 / fp16) params, kept in the optimizer state.

    A bf16 weight only changes when an update exceeds half its ulp (2^-9 of its magnitude): at
    lr 2e-5 most of Adam's updates round away, and RMSNorm scales (~1.0) never move. The master
    copy accumulates every update; the params are its cast (`SoftSteps` sets them to exactly
    `master.astype(param dtype)` after each step). Costs 4 bytes per parameter on top of the
    low-precision params, and the moments are fp32 unless `mu_dtype` says otherwise: bf16
    params with a master copy never use less memory than fp32 params, they only halve what
    FSDP gathers.
    """
    def init(params: Any) -> MasterWeightsState:
        master = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        return MasterWeightsState(master, tx.init(master))

    def update(grads: Any, state: MasterWeightsState, params: Any = None
               ) -> tuple[Any, MasterWeightsState]:
        g32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, inner = tx.update(g32, state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        if params is None:
            return updates, MasterWeightsState(master, inner)
        cast = jax.tree.map(lambda m, p: m.astype(p.dtype), master, params)
        return jax.tree.map(lambda c, p: c - p, cast, params), MasterWeightsState(master, inner)

    return optax.GradientTransformation(init, update)


def _low_precision(dtype: Any) -> bool:
    return jnp.dtype(dtype).itemsize < 4


@dataclasses.dataclass
class SoftSteps:
    """Builds and holds the jitted init/train/eval functions for one model, exit set and mesh."""

    model: Llama
    exits: Sequence[int]
    tx: optax.GradientTransformation
    mesh: Mesh
    rules: sharding.Rules = sharding.DEFAULT_RULES
    exit_weights: Sequence[float] | None = None
    grad_accum: int = 1
    rows_per_chunk: int = 4096
    schedule: Callable[[Array], Array] | None = None
    init_seq_len: int = 8
    # fp32 master weights in the optimizer state (`with_fp32_master`); None = exactly when the
    # model's params are bf16 / fp16.
    master_weights: bool | None = None
    # Curriculum of the exit weights (`soft.ExitSchedule`): SFT for `exit_hold_steps`, then a
    # linear ramp to `exit_weights` over `exit_ramp_steps`. 0 and 0: the weights from step 0.
    exit_ramp_steps: int = 0
    exit_hold_steps: int = 0
    # Self-distillation of every exit but the deepest toward its (detached) distribution.
    distill_weight: float = 0.0
    # Top-level params keys the optimizer trains (None: all); the rest stay bit-identical.
    trainable_keys: tuple[str, ...] | None = None
    # A frozen teacher (its params go to `set_teacher`) and the weight a_k of KL(p_teacher ||
    # p_k) per exit (the anchor): anchored SoFT.
    teacher: Llama | None = None
    anchor_weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        cfg = self.model.config
        self.exits, self.weights = soft.resolve_exit_set(self.exits, self.exit_weights,
                                                         cfg.num_hidden_layers)
        self.schedule_of_exits = soft.ExitSchedule(tuple(float(w) for w in self.weights),
                                                   self.exit_ramp_steps, self.exit_hold_steps)
        self.distill = soft.distill_weights(len(self.exits), self.distill_weight)
        if (self.teacher is None) != (self.anchor_weights is None):
            raise ValueError("an anchored step needs both a teacher model and anchor weights")
        if self.anchor_weights is not None:
            self.anchor_weights = np.asarray(self.anchor_weights, np.float32)
            if self.anchor_weights.shape != (len(self.exits),):
                raise ValueError(f"need one anchor weight per exit ({len(self.exits)}), got "
                                 f"{self.anchor_weights.shape}")
        self.teacher_params: Any = None
        if self.master_weights is None:
            self.master_weights = _low_precision(self.model.param_dtype)
        if self.master_weights:
            self.tx = with_fp32_master(self.tx)
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        self.abstract_state = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))
        self.state_shardings = sharding.tree_shardings(self.abstract_state, self.mesh,
                                                       self.rules)
        self.params_shardings = self.state_shardings.params
        self.batch_shardings = sharding.batch_sharding(self.mesh, self.rules)
        self.abstract_teacher = (None if self.teacher is None
                                 else abstract_params(self.teacher))
        self.teacher_shardings = None if self.teacher is None else sharding.tree_shardings(
            self.abstract_teacher, self.mesh, self.rules)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._init = jax.jit(self._init_unboxed, out_shardings=self.state_shardings)
        self._train = jax.jit(self._train_step,
                              in_shardings=(self.state_shardings, self.batch_shardings,
                                            self.teacher_shardings),
                              out_shardings=(self.state_shardings, replicated),
                              donate_argnums=0)
        self._eval = jax.jit(self._eval_step,
                             in_shardings=(self.params_shardings, self.batch_shardings),
                             out_shardings=replicated)

    # -- public ------------------------------------------------------------------------------
    def init_state(self, rng: Array) -> TrainState:
        with sharding.activation_sharding(self.mesh, self.rules):
            return self._init(rng)

    def state_from_params(self, params: Any) -> TrainState:
        """A fresh train state (step 0, new optimizer state) around given weights."""
        params = jax.device_put(params, self.params_shardings)
        make = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p,
                                            self.tx.init(self.split(p)[0])),
                       out_shardings=self.state_shardings)
        return make(params)

    def set_teacher(self, params: Any) -> None:
        """The anchored step's frozen teacher weights, placed once (sharded like a model's)."""
        if self.teacher is None:
            raise ValueError("this step has no teacher model")
        self.teacher_params = jax.device_put(params, self.teacher_shardings)

    def split(self, params: Any) -> tuple[Any, Any]:
        """(trainable, frozen) top-level parts of a params dict."""
        if self.trainable_keys is None:
            return params, {}
        missing = set(self.trainable_keys) - set(params)
        if missing:
            raise ValueError(f"trainable params {sorted(missing)} are not in the model")
        keep = set(self.trainable_keys)
        return ({k: v for k, v in params.items() if k in keep},
                {k: v for k, v in params.items() if k not in keep})

    def check_batch(self, global_batch_size: int) -> None:
        sharding.check_batch_size(global_batch_size, self.mesh, self.rules, self.grad_accum)

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        if self.teacher is not None and self.teacher_params is None:
            raise ValueError("set_teacher(params) before the first anchored step")
        with sharding.activation_sharding(self.mesh, self.rules):
            return self._train(state, batch, self.teacher_params)

    def eval_step(self, params: Any, batch: Batch) -> soft.ExitSums:
        with sharding.activation_sharding(self.mesh, self.rules):
            return self._eval(params, batch)

    def lower_train_step(self, batch_shape: tuple[int, int]) -> Any:
        """The lowered step for abstract inputs (memory planning, compiled-memory tests)."""
        b, t = batch_shape
        batch = {
            "input_ids": jax.ShapeDtypeStruct((b, t), jnp.int32),
            "targets": jax.ShapeDtypeStruct((b, t), jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct((b, t), jnp.float32),
            "attention_mask": jax.ShapeDtypeStruct((b, t), jnp.int32),
        }
        unbox = lambda tree: jax.tree.map(  # noqa: E731
            lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, tree,
            is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        teacher = None if self.teacher is None else unbox(self.abstract_teacher)
        with sharding.activation_sharding(self.mesh, self.rules):
            return self._train.lower(unbox(self.abstract_state), batch, teacher)

    # -- traced ------------------------------------------------------------------------------
    def _init_boxed(self, rng: Array) -> TrainState:
        ids = jnp.zeros((1, self.init_seq_len), jnp.int32)
        params = with_exit_adapters(self.model.init(rng, ids, method=Llama.touch_all)["params"],
                                    self.model.config)
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(self.split(params)[0]))

    def _init_unboxed(self, rng: Array) -> TrainState:
        return nn.unbox(self._init_boxed(rng))

    def _exit_states(self, params: Any, batch: Batch) -> Array:
        """`[K, B, T, D]`: the exits' hidden states, through their adapters where they have
        one."""
        positions = batch.get("positions") if "segment_ids" in batch else None
        out = self.model.apply({"params": params}, batch["input_ids"],
                               attention_mask=batch.get("attention_mask"),
                               segment_ids=batch.get("segment_ids"), positions=positions,
                               exits=self.exits)
        if not self.model.config.exit_adapters:
            return out.hidden
        return apply_adapters(self.model, params, out.hidden, self.exits, positions=positions,
                              attention_mask=batch.get("attention_mask"),
                              segment_ids=batch.get("segment_ids"))

    def _teacher(self, teacher_params: Any, batch: Batch) -> Teacher | None:
        """The frozen teacher's final state, norm and head on this batch (no gradient)."""
        if teacher_params is None:
            return None
        cfg = self.teacher.config
        positions = batch.get("positions") if "segment_ids" in batch else None
        out = self.teacher.apply({"params": teacher_params}, batch["input_ids"],
                                 attention_mask=batch.get("attention_mask"),
                                 segment_ids=batch.get("segment_ids"), positions=positions,
                                 exits=(cfg.num_hidden_layers,))
        scale, kernel = head_weights(teacher_params, cfg)
        sg = jax.lax.stop_gradient
        return Teacher(sg(out.hidden[0]), sg(scale), sg(kernel), self.anchor_weights)

    def _loss_sums(self, params: Any, batch: Batch, step: Array | None = None,
                   teacher_params: Any = None) -> tuple[Array, soft.ExitSums]:
        """Weighted loss sum and per-exit sums; the exit weights of `step` (None: the target)."""
        cfg = self.model.config
        scale, kernel = head_weights(params, cfg)
        weights = (self.weights if step is None else self.schedule_of_exits.at(step))
        return soft.multi_exit_losses(self._exit_states(params, batch), scale, kernel,
                                      batch["targets"], batch["loss_mask"], weights,
                                      eps=cfg.rms_norm_eps, rows_per_chunk=self.rows_per_chunk,
                                      rules=self.rules, distill_weights=self.distill,
                                      teacher=self._teacher(teacher_params, batch))

    def _grads(self, params: Any, batch: Batch, step: Array | None = None,
               teacher_params: Any = None) -> tuple[Array, soft.ExitSums, Any]:
        """Unnormalised weighted loss sum, per-exit sums and the gradient of the trainable
        params (only those: the frozen ones' is never computed) over the whole batch."""
        trainable, frozen = self.split(params)

        def loss(t: Any, mb: Batch) -> tuple[Array, soft.ExitSums]:
            return self._loss_sums({**frozen, **t}, mb, step, teacher_params)

        grad_fn = jax.value_and_grad(loss, has_aux=True)
        if self.grad_accum == 1:
            (total, sums), grads = grad_fn(trainable, batch)
            return total, sums, grads

        a = self.grad_accum
        batch_axes = sharding.batch_sharding(self.mesh, self.rules).spec[0]

        def split(x: Array) -> Array:
            # Row r of micro-batch j is row r * a + j: each micro-batch keeps the batch axis
            # split over the data-parallel devices.
            x = x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1)
            spec = PartitionSpec(None, batch_axes, *([None] * (x.ndim - 2)))
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

        micro = jax.tree.map(split, batch)

        def body(carry, mb):
            total, sums, grads = carry
            (t, s), g = grad_fn(trainable, mb)
            grads = jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), grads, g)
            return (total + t, sums + s, grads), None

        k = len(self.exits)
        zeros = soft.ExitSums.zeros(k, distill=self.distill is not None,
                                    anchor=teacher_params is not None)
        init = (jnp.zeros(()), zeros,
                jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable))
        (total, sums, grads), _ = jax.lax.scan(body, init, micro)
        return total, sums, grads

    def _train_step(self, state: TrainState, batch: Batch, teacher_params: Any = None
                    ) -> tuple[TrainState, dict]:
        total, sums, grads = self._grads(state.params, batch, state.step, teacher_params)
        trainable, frozen = self.split(state.params)
        n = jnp.maximum(sums.tokens, 1.0)
        grad_dtype = (lambda p: jnp.float32) if self.master_weights else (lambda p: p.dtype)
        grads = jax.tree.map(lambda g, p: (g / n).astype(grad_dtype(p)), grads, trainable)
        updates, opt_state = self.tx.update(grads, state.opt_state, trainable)
        if isinstance(opt_state, MasterWeightsState):  # exactly the master's cast, no rounding
            new = jax.tree.map(lambda m, p: m.astype(p.dtype), opt_state.master, trainable)
        else:
            new = optax.apply_updates(trainable, updates)
        params = {**frozen, **new}  # frozen leaves are the very same arrays: bit-identical
        metrics = {"loss": total / n, "grad_norm": optax.tree.norm(grads),
                   **soft.exit_metrics(sums, self.exits)}
        if self.schedule is not None:
            metrics["lr"] = self.schedule(state.step)
        if not self.schedule_of_exits.constant:  # the curriculum's weights of this step
            w = self.schedule_of_exits.at(state.step)
            metrics.update({f"exit_weight/exit_{e}": w[i] for i, e in enumerate(self.exits)})
        return TrainState(state.step + 1, params, opt_state), metrics

    def _eval_step(self, params: Any, batch: Batch) -> soft.ExitSums:
        return self._loss_sums(params, batch)[1]


def to_global_batch(batch: dict[str, np.ndarray], shardings: NamedSharding) -> Batch:
    """This process's rows of the global batch -> global jax.Arrays (multi-host aware)."""
    return {k: jax.make_array_from_process_local_data(shardings, np.asarray(v))
            for k, v in batch.items()}


def sum_exit_sums(eval_step: Callable[[Batch], soft.ExitSums], batches: Iterable[dict],
                  shardings: NamedSharding, max_batches: int = 0) -> soft.ExitSums | None:
    """`eval_step` over this process's `batches` (made global), summed: metrics are divided
    once at the end (`soft.exit_metrics`), not averaged per batch. None for no batches."""
    total = None
    for i, local in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        sums = eval_step(to_global_batch(local, shardings))
        total = sums if total is None else total + sums
    return total
