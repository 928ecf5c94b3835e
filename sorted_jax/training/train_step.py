"""The sharded, jitted SoFT train and eval steps.

One `jax.jit` per step with explicit in/out shardings and donated state. Gradient accumulation
is a `lax.scan` over micro-batches that adds unnormalised loss sums, gradients and token
counts, and divides once, so A micro-batches give exactly the step on the whole batch.
SFT is the same code with the exit set {L}.

Two ways to keep the full model where SFT would take it: `trainable_keys` (top-level keys) or
`trainable` (a predicate on a leaf's path) trains only part of the params (e.g. exit adapters
on a frozen trunk: the gradient is taken with respect to those params only, so the trunk's is
never computed, and the optimizer holds state for them only); `teacher` anchors the exits to a
frozen model's distribution (its forward pass runs inside the step on the same batch; its
params are a step argument, never in the optimizer or the checkpoint).

A LoRA model (`model.lora`, `sorted_jax.model.lora`) trains its adapters (and norms with
`train_norms`) only, and its frozen base is a step argument like the teacher (`set_frozen`,
quantised there when the base is): the train state, and so each checkpoint, holds the adapters,
their optimizer state and the step, nothing of the base.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sorted_jax.model import lora
from sorted_jax.model.exit_adapters import apply_adapters
from sorted_jax.model.modeling import Llama, abstract_params, head_weights, with_exit_adapters
from sorted_jax.objective import soft
from sorted_jax.objective.exit_loss import Teacher
from sorted_jax.parallel import sharding
from sorted_jax.training.optimizer import (  # noqa: F401  (re-exported)
    MasterWeightsState,
    low_precision,
    make_optimizer,
    with_fp32_master,
)

Array = jax.Array
Batch = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any


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
    # Or a predicate on a leaf's path (a tuple of keys) saying whether it trains. A LoRA model
    # defaults it to its adapters (`lora.trainable`).
    trainable: Callable[[tuple[str, ...]], bool] | None = None
    # LoRA dropout masks: drawn from this seed, folded with the step (and micro-batch).
    dropout_seed: int = 0
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
        self.frozen_params: Any = None
        self.lora = self.model.lora
        if self.trainable_keys is not None and self.trainable is not None:
            raise ValueError("give trainable_keys or trainable, not both")
        if self.trainable is None and self.lora is not None:
            self.trainable = lora.trainable(self.lora)
        # LoRA: the frozen base is a step argument, outside the state (and the checkpoints).
        self.frozen_outside = self.lora is not None
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        full = jax.eval_shape(self._init_params_boxed, jax.random.PRNGKey(0))
        trainable, frozen = self.split(full)
        if self.master_weights is None:  # exactly when a trained leaf is bf16 / fp16
            self.master_weights = any(low_precision(x.value.dtype) for x in jax.tree.leaves(
                trainable, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
        if self.master_weights:
            self.tx = with_fp32_master(self.tx)
        self.abstract_state = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))
        self.state_shardings = sharding.tree_shardings(self.abstract_state, self.mesh,
                                                       self.rules)
        self.params_shardings = self.state_shardings.params
        self.abstract_frozen = (lora.quantise_base(frozen, self.lora) if self.frozen_outside
                                else None)
        self.frozen_shardings = None if self.abstract_frozen is None else (
            sharding.tree_shardings(self.abstract_frozen, self.mesh, self.rules))
        self.batch_shardings = sharding.batch_sharding(self.mesh, self.rules)
        self.abstract_teacher = (None if self.teacher is None
                                 else abstract_params(self.teacher))
        self.teacher_shardings = None if self.teacher is None else sharding.tree_shardings(
            self.abstract_teacher, self.mesh, self.rules)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._init = jax.jit(self._init_unboxed, out_shardings=self.state_shardings)
        self._train = jax.jit(self._train_step,
                              in_shardings=(self.state_shardings, self.batch_shardings,
                                            self.teacher_shardings, self.frozen_shardings),
                              out_shardings=(self.state_shardings, replicated),
                              donate_argnums=0)
        self._eval = jax.jit(self._eval_step,
                             in_shardings=(self.params_shardings, self.batch_shardings,
                                           self.frozen_shardings),
                             out_shardings=replicated)

    # -- public ------------------------------------------------------------------------------
    def init_state(self, rng: Array) -> TrainState:
        with sharding.activation_sharding(self.mesh, self.rules):
            return self._init(rng)

    def state_from_params(self, params: Any) -> TrainState:
        """A fresh train state (step 0, new optimizer state) around given weights (all of
        them: a LoRA model's base goes to `set_frozen`, its adapters into the state)."""
        if self.frozen_outside:
            params, frozen = self.split(params)
            if frozen:  # else the base was placed before (`set_frozen`)
                self.set_frozen(frozen)
        params = jax.device_put(params, self.params_shardings)
        make = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p,
                                            self.tx.init(self._trained(p))),
                       out_shardings=self.state_shardings)
        return make(params)

    def fresh_adapters(self, rng: Array) -> dict:
        """A LoRA model's adapter leaves as `init` makes them (B = 0: the base's outputs),
        in their shardings; nothing else of the init is computed."""
        shardings = lora.split_tree(self.params_shardings, lora.is_adapter)[0]
        make = jax.jit(lambda r: lora.split_tree(
            nn.unbox(self._init_params_boxed(r)), lora.is_adapter)[0], out_shardings=shardings)
        return make(rng)

    def set_frozen(self, frozen: Any) -> None:
        """A LoRA model's frozen base (numpy or jax leaves in any float dtype), cast to the
        base dtype and placed once in its shardings; layer kernels quantised one layer at a
        time on the way when the base is quantised."""
        if not self.frozen_outside:
            raise ValueError("this step holds its frozen params in the train state")
        spec, shardings = self.lora, self.frozen_shardings
        abstract = nn.unbox(self.abstract_frozen)

        def place(path: tuple[str, ...], leaf: Any) -> Any:
            if spec.quantised and lora.quantised_kernel_path(path):
                layers = [lora.quantise_leaf(path, np.asarray(leaf[i:i + 1], np.float32),
                                             spec.base_dtype) for i in range(leaf.shape[0])]
                parent = path[:-1]
                return {k: jax.device_put(
                    np.concatenate([np.asarray(x[k]) for x in layers]),
                    _at(shardings, (*parent, k))) for k in layers[0]}
            dtype = _at(abstract, path).dtype
            if isinstance(leaf, np.ndarray):
                return jax.device_put(leaf.astype(dtype), _at(shardings, path))
            return jax.jit(lambda x: x.astype(dtype), out_shardings=_at(shardings, path))(leaf)

        def walk(tree: Any, path: tuple[str, ...]) -> dict:
            out: dict = {}
            for k, v in tree.items():
                p = (*path, str(k))
                if isinstance(v, dict):
                    out[k] = walk(v, p)
                elif spec.quantised and lora.quantised_kernel_path(p):
                    out.update(place(p, v))
                else:
                    out[k] = place(p, v)
            return out

        self.frozen_params = walk(frozen, ())

    def set_teacher(self, params: Any) -> None:
        """The anchored step's frozen teacher weights, placed once (sharded like a model's)."""
        if self.teacher is None:
            raise ValueError("this step has no teacher model")
        self.teacher_params = jax.device_put(params, self.teacher_shardings)

    def split(self, params: Any) -> tuple[Any, Any]:
        """(trainable, frozen) parts of a params dict (`trainable_keys` or `trainable`)."""
        if self.trainable is not None:
            return lora.split_tree(params, self.trainable)
        if self.trainable_keys is None:
            return params, {}
        missing = set(self.trainable_keys) - set(params)
        if missing:
            raise ValueError(f"trainable params {sorted(missing)} are not in the model")
        keep = set(self.trainable_keys)
        return ({k: v for k, v in params.items() if k in keep},
                {k: v for k, v in params.items() if k not in keep})

    def _trained(self, params: Any) -> Any:
        """The part of the state's params the optimizer updates."""
        return params if self.frozen_outside else self.split(params)[0]

    def check_batch(self, global_batch_size: int) -> None:
        sharding.check_batch_size(global_batch_size, self.mesh, self.rules, self.grad_accum)

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        if self.teacher is not None and self.teacher_params is None:
            raise ValueError("set_teacher(params) before the first anchored step")
        self._need_frozen()
        with sharding.activation_sharding(self.mesh, self.rules):
            return self._train(state, batch, self.teacher_params, self.frozen_params)

    def eval_step(self, params: Any, batch: Batch) -> soft.ExitSums:
        self._need_frozen()
        with sharding.activation_sharding(self.mesh, self.rules):
            return self._eval(params, batch, self.frozen_params)

    def _need_frozen(self) -> None:
        if self.frozen_outside and self.frozen_params is None:
            raise ValueError("set_frozen(base params) before the first LoRA step")

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
        frozen = None if self.abstract_frozen is None else unbox(self.abstract_frozen)
        with sharding.activation_sharding(self.mesh, self.rules):
            return self._train.lower(unbox(self.abstract_state), batch, teacher, frozen)

    # -- traced ------------------------------------------------------------------------------
    def _init_params_boxed(self, rng: Array) -> Any:
        ids = jnp.zeros((1, self.init_seq_len), jnp.int32)
        return with_exit_adapters(self.model.init(rng, ids, method=Llama.touch_all)["params"],
                                  self.model.config)

    def _init_boxed(self, rng: Array) -> TrainState:
        params = self._init_params_boxed(rng)
        if self.frozen_outside:
            params = self.split(params)[0]
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(self._trained(params)))

    def _init_unboxed(self, rng: Array) -> TrainState:
        return nn.unbox(self._init_boxed(rng))

    def _exit_states(self, params: Any, batch: Batch, rng: Array | None = None) -> Array:
        """`[K, B, T, D]`: the exits' hidden states, through their adapters where they have
        one. `rng`: LoRA dropout's (training only)."""
        positions = batch.get("positions") if "segment_ids" in batch else None
        rngs = None if rng is None else {"dropout": rng}
        out = self.model.apply({"params": params}, batch["input_ids"],
                               attention_mask=batch.get("attention_mask"),
                               segment_ids=batch.get("segment_ids"), positions=positions,
                               exits=self.exits, rngs=rngs)
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
                   teacher_params: Any = None, rng: Array | None = None
                   ) -> tuple[Array, soft.ExitSums]:
        """Weighted loss sum and per-exit sums; the exit weights of `step` (None: the target)."""
        cfg = self.model.config
        scale, kernel = head_weights(params, cfg)
        weights = (self.weights if step is None else self.schedule_of_exits.at(step))
        return soft.multi_exit_losses(self._exit_states(params, batch, rng), scale, kernel,
                                      batch["targets"], batch["loss_mask"], weights,
                                      eps=cfg.rms_norm_eps, rows_per_chunk=self.rows_per_chunk,
                                      rules=self.rules, distill_weights=self.distill,
                                      teacher=self._teacher(teacher_params, batch))

    def _dropout_rng(self, step: Array | None) -> Array | None:
        if self.lora is None or not self.lora.dropout > 0 or step is None:
            return None
        return jax.random.fold_in(jax.random.PRNGKey(self.dropout_seed), step)

    def _grads(self, trainable: Any, frozen: Any, batch: Batch, step: Array | None = None,
               teacher_params: Any = None) -> tuple[Array, soft.ExitSums, Any]:
        """Unnormalised weighted loss sum, per-exit sums and the gradient of the trainable
        params (only those: the frozen ones' is never computed) over the whole batch."""
        rng = self._dropout_rng(step)

        def loss(t: Any, mb: Batch, r: Array | None) -> tuple[Array, soft.ExitSums]:
            return self._loss_sums(lora.merge_trees(frozen, t), mb, step, teacher_params, r)

        grad_fn = jax.value_and_grad(loss, has_aux=True)
        if self.grad_accum == 1:
            (total, sums), grads = grad_fn(trainable, batch, rng)
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

        def body(carry, xs):
            total, sums, grads = carry
            mb, j = xs
            r = None if rng is None else jax.random.fold_in(rng, j)
            (t, s), g = grad_fn(trainable, mb, r)
            grads = jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), grads, g)
            return (total + t, sums + s, grads), None

        k = len(self.exits)
        zeros = soft.ExitSums.zeros(k, distill=self.distill is not None,
                                    anchor=teacher_params is not None)
        init = (jnp.zeros(()), zeros,
                jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable))
        (total, sums, grads), _ = jax.lax.scan(body, init, (micro, jnp.arange(a)))
        return total, sums, grads

    def _train_step(self, state: TrainState, batch: Batch, teacher_params: Any = None,
                    frozen_params: Any = None) -> tuple[TrainState, dict]:
        if self.frozen_outside:
            trainable, frozen = state.params, frozen_params
        else:
            trainable, frozen = self.split(state.params)
        total, sums, grads = self._grads(trainable, frozen, batch, state.step, teacher_params)
        n = jnp.maximum(sums.tokens, 1.0)
        grad_dtype = (lambda p: jnp.float32) if self.master_weights else (lambda p: p.dtype)
        grads = jax.tree.map(lambda g, p: (g / n).astype(grad_dtype(p)), grads, trainable)
        updates, opt_state = self.tx.update(grads, state.opt_state, trainable)
        if isinstance(opt_state, MasterWeightsState):  # exactly the master's cast, no rounding
            new = jax.tree.map(lambda m, p: m.astype(p.dtype), opt_state.master, trainable)
        else:
            new = optax.apply_updates(trainable, updates)
        # frozen leaves are the very same arrays: bit-identical
        params = new if self.frozen_outside else lora.merge_trees(frozen, new)
        metrics = {"loss": total / n, "grad_norm": optax.tree.norm(grads),
                   **soft.exit_metrics(sums, self.exits)}
        if self.schedule is not None:
            metrics["lr"] = self.schedule(state.step)
        if not self.schedule_of_exits.constant:  # the curriculum's weights of this step
            w = self.schedule_of_exits.at(state.step)
            metrics.update({f"exit_weight/exit_{e}": w[i] for i, e in enumerate(self.exits)})
        return TrainState(state.step + 1, params, opt_state), metrics

    def _eval_step(self, params: Any, batch: Batch, frozen_params: Any = None
                   ) -> soft.ExitSums:
        if self.frozen_outside:
            params = lora.merge_trees(frozen_params, params)
        return self._loss_sums(params, batch)[1]


def _at(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


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
