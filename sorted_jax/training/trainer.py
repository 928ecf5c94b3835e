"""The training run behind `python -m sorted_jax.train`: `Trainer(config, workdir).train()`.

A `Trainer` is everything a run needs, validated and built in `__init__`: the workdir claimed
and locked (`run_spec.claim`: process 0 takes its writer lock, every process agrees before going
on; `train()` releases it), the resolved spec (`run_spec.resolve`: every check that needs no
device), then the mesh and batch sizes, the
tokenizer and data (`run_data`), then the jitted steps (`train_step.SoftSteps`) and the train
state (restored from the workdir, loaded from init_from, or freshly initialised). Nothing is
compiled before the config, the workdir and the data have been checked.

Its loop is `train_steps()`, a generator of `train_loop.StepInfo`s; logging, evaluation and
checkpoints are `train_loop.Hooks` that run every N steps. A step's metrics reach the host one
step late, so the host never waits for the device except where a hook reads the state.

Health: a step's loss and gradient norm are computed at the previous step's weights, so they
decide the health of the checkpoint at that step (`checkpoint_integrity`); a non-finite one stops
the run (`NonFiniteLossError`) naming the last good checkpoint, without saving the bad state.
A background save that failed stops the run at the next step boundary (`CheckpointError`).
`run_status.json` records how each launch ended.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils

from sorted_jax.core import errors
from sorted_jax.core.errors import NonFiniteLossError, TrainConfigError
from sorted_jax.data import DataError, load_tokenizer
from sorted_jax.io import model_io
from sorted_jax.model import modeling
from sorted_jax.model.modeling import DTYPES, EXIT_ADAPTERS
from sorted_jax.objective import soft
from sorted_jax.parallel.distributed import on_every_process
from sorted_jax.parallel.sharding import MeshError, check_batch_size, make_mesh
from sorted_jax.training import checkpoint_integrity, frozen, metrics_log, run_spec, run_status
from sorted_jax.training.checkpoint import Checkpointer, CheckpointError
from sorted_jax.training.exit_report import ExitReport
from sorted_jax.training.lora_run import base_param_dtype, fresh_state, lora_spec, setup_base
from sorted_jax.training.run_data import load_data, make_iterators
from sorted_jax.training.run_spec import RunSpec, mu_dtype_of
from sorted_jax.training.train_loop import Hooks, StepInfo, StopSignals, Window
from sorted_jax.training.train_step import (
    SoftSteps,
    TrainState,
    make_optimizer,
    sum_exit_sums,
    to_global_batch,
)

__all__ = ["Trainer"]


def _host(tree: Any) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


_QUANTITIES = {"loss": "the loss", "grad_norm": "the gradient norm"}


def _non_finite_names(metrics: Mapping[str, float]) -> list[str]:
    """Which of the loss and the gradient norm are NaN / inf."""
    return [name for k, name in _QUANTITIES.items()
            if k in metrics and not math.isfinite(metrics[k])]


class Trainer:
    """Everything a run needs, validated and built in `__init__` (in the order the module
    docstring gives); `train()` runs the loop and returns the final metrics."""

    def __init__(self, config: ml_collections.ConfigDict | RunSpec,
                 workdir: str | Path | None = None):
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.is_main = self.process_index == 0
        if isinstance(config, RunSpec):
            spec = config
        else:  # process 0 alone takes the workdir's writer lock: one lock per run. If one
            # process is refused (another run holds the workdir), every one stops at once.
            dest = on_every_process(lambda: run_spec.claim(config, workdir, lock=self.is_main),
                                    lambda d: d.release())
            spec = run_spec.resolve(config, workdir, claimed=dest)
        try:
            self._setup(spec)
        except BaseException:
            spec.release()
            raise

    def _setup(self, spec: RunSpec) -> None:
        self.spec, self.cfg, self.workdir = spec, spec.config, spec.workdir
        self._progress: metrics_log.Progress | None = None
        self.resume_step, self.resume_note = spec.resume_step, spec.resume_note
        self.model_config, self.model_source = spec.model_config, spec.model_source
        self.exits, self.exit_weights = spec.exits, spec.exit_weights
        self.eval_exits, self.tokenizer_spec = spec.eval_exits, spec.tokenizer_spec
        self._setup_mesh()
        self._setup_data()
        self._setup_steps()
        # A LoRA run's frozen base placed in the steps, checked against a resumed run's
        # checkpoints before anything is written (`_lora_base`: the part of it that trains).
        self._lora_base, self.lora_record = setup_base(self.cfg, self.steps, self.eval_steps,
                                                       self.workdir, self.resume_step)
        if self.is_main:
            spec.write_files()
            for line in self.data.write_stats(self.workdir, self.cfg.max_len):
                self.note(line)
        self._set_aside_newer_steps()
        self.checkpointer = Checkpointer(self.workdir, keep=self.cfg.keep_checkpoints,
                                         async_save=self.cfg.async_checkpointing,
                                         on_saved=self._saved)
        self.state, self.start_step = self._initial_state()
        if self.steps.teacher is not None:
            self.steps.set_teacher(frozen.load_teacher(self.cfg, self.steps.teacher_shardings))
            self.note(f"anchored to teacher {frozen.teacher_source(self.cfg)} (weight "
                      f"{self.cfg.anchor_weight} on exit {self.exits[-1]})")
        self.step = self.start_step
        # the newest checkpoint whose weights no step has been computed on yet (its health)
        self._unchecked: int | None = self.resume_step
        self.logger = metrics_log.MetricsLogger(
            self.workdir, tensorboard=self.cfg.tensorboard,
            resumed_from=self.resume_step) if self.is_main else None
        self._stop = StopSignals(self.process_count)
        self.interrupted: str | None = None
        self._last_eval: tuple[int, dict[str, float]] | None = None
        self._last_train: dict[str, Any] = {}
        self.exit_report = ExitReport(self.workdir, self.model_config.num_hidden_layers,
                                      self.exits)

    # -- setup -------------------------------------------------------------------------------
    def _setup_mesh(self) -> None:
        """The mesh, and batch sizes that fit it and the process count."""
        c, n = self.cfg, self.process_count
        self.mesh = make_mesh(self.spec.mesh_shape)
        self.rules = self.spec.rules
        check_batch_size(c.batch_size, self.mesh, self.rules, c.grad_accum)
        if c.batch_size % n:
            raise TrainConfigError(f"batch_size={c.batch_size} is not divisible by the {n} "
                                   "processes")
        self.eval_batch_size = self.spec.eval_batch_size
        try:
            check_batch_size(self.eval_batch_size, self.mesh, self.rules)
        except MeshError as e:
            raise e.prefixed("eval_batch_size: ") from None
        if self.eval_batch_size % n:
            raise TrainConfigError(f"eval batch size {self.eval_batch_size} is not divisible by "
                                   f"the {n} processes")

    def _setup_data(self) -> None:
        """Tokenizer, records and this process's iterators; the run's length in steps."""
        spec = self.spec
        self.tokenizer = load_tokenizer(spec.tokenizer_spec)
        spec.check_tokenizer(self.tokenizer)
        self.data = load_data(self.cfg, self.tokenizer)
        self.train_iter, self.eval_iter = make_iterators(
            self.cfg, self.data, spec.buckets, self.eval_batch_size, self.process_index,
            self.process_count, self.note)
        self.steps_per_epoch = self.train_iter.steps_per_epoch
        self.total_steps = spec.total_steps(self.steps_per_epoch)
        if spec.warmup_steps(self.total_steps) > self.total_steps:
            self.note(f"warning: the warmup (optim.warmup_steps / warmup_ratio) is longer than "
                      f"the run's {self.total_steps} steps: the lr never reaches optim.lr")

    def _setup_steps(self) -> None:
        """The model, the optimizer and the jitted train / eval steps (traced, not compiled)."""
        c, o = self.cfg, self.cfg.optim
        spec = lora_spec(c)
        self.model = modeling.make_model(
            self.model_config, dtype=DTYPES[c.dtype], param_dtype=base_param_dtype(c, spec),
            attention_impl=c.attention_impl, remat_policy=c.remat_policy, lora=spec)
        tx, schedule = make_optimizer(
            lr=o.lr, total_steps=self.total_steps,
            warmup_steps=self.spec.warmup_steps(self.total_steps), schedule=o.schedule,
            end_lr_ratio=o.end_lr_ratio, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
            eps=o.eps, clip_norm=o.clip_norm or None, mu_dtype=mu_dtype_of(c))
        hold, ramp = self.spec.exit_curriculum_steps(self.total_steps)
        self.steps = SoftSteps(self.model, self.exits, tx, self.mesh, self.rules,
                               exit_weights=list(self.exit_weights), grad_accum=c.grad_accum,
                               rows_per_chunk=c.loss_rows_per_chunk, schedule=schedule,
                               exit_hold_steps=hold, exit_ramp_steps=ramp,
                               distill_weight=float(c.distill_weight),
                               trainable_keys=(EXIT_ADAPTERS,) if c.exit_adapters != "none"
                               else None, teacher=frozen.teacher_model(c, self.model_config),
                               anchor_weights=frozen.anchor_weights(c, self.exits),
                               dropout_seed=c.seed)
        self.eval_steps = self.steps if self.eval_exits == self.exits else SoftSteps(
            self.model, self.eval_exits, tx, self.mesh, self.rules,
            rows_per_chunk=c.loss_rows_per_chunk)
        self._count_tokens = jax.jit(lambda m: jnp.sum(m.astype(jnp.int32)))
        self._params_finite = jax.jit(lambda p: jnp.all(jnp.asarray(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])))

    def _set_aside_newer_steps(self) -> None:
        """Resuming from an older step than the newest on disk (a damaged or diverged newer
        one, or resume_step): move the newer ones aside so this run writes them afresh."""
        if self.resume_step is None:
            return
        if self.resume_note:
            self.note(f"warning: {self.resume_note}")
        if self.process_count > 1:  # every process has read the checkpoints it chose from
            multihost_utils.sync_global_devices("sorted_jax: resume step chosen")
        if self.is_main:
            checkpoint_integrity.set_aside_after(self.workdir, self.resume_step)
        if self.process_count > 1:
            multihost_utils.sync_global_devices("sorted_jax: newer checkpoints set aside")

    def note(self, text: str) -> None:
        """A line above the progress bar (process 0 only)."""
        if self.is_main:
            if self._progress is not None:
                self._progress.write(text)
            else:
                print(text, flush=True)

    def _initial_state(self) -> tuple[TrainState, int]:
        c = self.cfg
        if self.resume_step is not None:
            state, data_state, meta = self.checkpointer.restore(
                self.resume_step, nn.unbox(self.steps.abstract_state),
                self.steps.state_shardings)
            try:
                self.train_iter.load_state_dict(data_state)
            except (KeyError, DataError) as e:
                raise CheckpointError(f"the data position saved at step {self.resume_step} does "
                                      f"not fit this run's data: {e}") from None
            changed = self.spec.changed_fields(meta.get("train_config", {}))
            if changed:
                self.note(f"warning: resuming with changed config fields {changed} (the "
                          "checkpoint was written with different values)")
            self.note(f"resuming {self.workdir} from step {self.resume_step} (data epoch "
                     f"{self.train_iter.epoch}, example {self.train_iter.index})"
                     + ("; init_from ignored" if c.init_from and not self.lora_record else ""))
            return state, self.resume_step
        if self.lora_record is not None:
            state, note = fresh_state(self.steps, self._lora_base, c)
            self.note(note)
            return state, 0
        if c.exit_adapters != "none":
            params = frozen.load_trunk_with_adapters(c, self.model_config,
                                                     self.steps.params_shardings)
            self.note(f"frozen trunk {c.init_from}, exit adapters at "
                      f"{list(self.model_config.exit_adapters)} (init: {c.exit_adapter_init})")
            return self.steps.state_from_params(params), 0
        if c.init_from:
            # Straight into the state's shardings: each process reads only its shards, so no
            # host ever holds a full copy of the model (7B fp32 is 27 GB per process otherwise).
            params, _, _ = model_io.load_params(c.init_from, dtype=c.param_dtype,
                                                shardings=self.steps.params_shardings)
            self.note(f"loaded weights from {c.init_from} (fresh optimizer, step 0)")
            return self.steps.state_from_params(params), 0
        return self.steps.init_state(jax.random.PRNGKey(c.seed)), 0

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, params: Any) -> dict[str, float] | None:
        """Per-exit loss/accuracy on the held-out set: ExitSums summed, divided once."""
        if self.eval_iter is None:
            return None
        total = sum_exit_sums(lambda batch: self.eval_steps.eval_step(params, batch),
                              self.eval_iter, self.eval_steps.batch_shardings,
                              self.cfg.eval_batches)
        return _host(soft.exit_metrics(total, self.eval_exits))

    def _eval_and_log(self, step: int) -> dict[str, float] | None:
        t0 = time.time()
        metrics = self.evaluate(self.state.params)
        if metrics is None:
            return None
        metrics["eval_time_s"] = time.time() - t0
        self._last_eval = (step, metrics)
        self.note(f"eval @ {step}: " + metrics_log.compact_exits(metrics)
                  + f" ({metrics['eval_time_s']:.1f}s)")
        if self.logger:
            self.logger.write(step, "eval", metrics)
            self.logger.flush()
            self.exit_report.add_eval(step, metrics)
        return metrics

    # -- the loop ----------------------------------------------------------------------------
    def _non_finite(self, what: str) -> None:
        with contextlib.suppress(CheckpointError):  # a save in flight may be the last good one
            self.checkpointer.wait()
        where = self.checkpointer.last_good_text()
        raise NonFiniteLossError(f"{what}; stopped without saving this state. {where} "
                                 "Lower optim.lr (or set optim.clip_norm), then resume from it "
                                 "with --config.resume_step=N or start a new workdir.")

    def _save(self, step: int) -> None:
        if not bool(self._params_finite(self.state.params)):
            self._non_finite(f"the parameters became non-finite at step {step}")
        meta = self.spec.checkpoint_meta(step, self.total_steps, self.process_count)
        meta.update(self.lora_record.to_meta() if self.lora_record else {})  # the adapters' base
        if self.checkpointer.save(step, self.state, self.train_iter.state_dict(), meta):
            self._unchecked = step

    def _saved(self, step: int) -> None:
        """A checkpoint is on disk (committed): say so, and record it in run_status.json (a
        kill -9 later leaves "running" at this step)."""
        self.note(f"checkpoint: step {step}")
        self._status(run_status.RUNNING, step=step)

    def _fetch(self, step: int, metrics: Any, tokens: Any) -> StepInfo:
        """Step `step`'s metrics on the host. They are the loss and gradient norm *at the
        weights of step - 1*: they decide that checkpoint's health."""
        metrics, tokens = jax.device_get((metrics, tokens))  # one transfer for both
        host = _host(metrics)
        bad = _non_finite_names(host)
        detail = f"loss={host.get('loss')}, grad_norm={host.get('grad_norm')}"
        if self._unchecked == step - 1:
            self.checkpointer.record_health(
                step - 1, checkpoint_integrity.DIVERGED if bad else checkpoint_integrity.GOOD,
                f"{detail} at these weights (step {step})")
            self._unchecked = None
        if bad:
            self._non_finite(f"{' and '.join(bad)} became non-finite at step {step} ({detail}, "
                             f"computed at the weights of step {step - 1})")
        return StepInfo(step, host, int(tokens))

    def _should_stop(self) -> bool:
        # Multi-process runs agree on stopping at log boundaries (a collective each step
        # would stall the device pipeline).
        if self.process_count > 1 and self.step % self.cfg.log_every:
            return False
        if self._stop.requested():
            self.interrupted = self._stop.name
        return self.interrupted is not None

    def train_steps(self, hooks: Hooks) -> Iterator[StepInfo]:
        """Train steps until `total_steps` (or a stop signal), each yielded once finished.

        A step's metrics are fetched one step late, so the host never waits for the device,
        except where `hooks` has a hook due that reads the train state (evaluation, a
        checkpoint): that step is yielded before the next one is dispatched. `self.step` and
        `self.state` are always the latest dispatched step's.
        """
        pending = None
        while self.step < self.total_steps and not self._should_stop():
            self.checkpointer.poll()  # a failed background save stops the run here
            batch = to_global_batch(next(self.train_iter), self.steps.batch_shardings)
            self.state, metrics = self.steps.train_step(self.state, batch)
            self.step += 1
            current = (self.step, metrics, self._count_tokens(batch["attention_mask"]))
            if pending is not None:
                yield self._fetch(*pending)
            pending = current
            if hooks.need_state(self.step, self.total_steps):
                yield self._fetch(*pending)
                pending = None
        if pending is not None:
            yield self._fetch(*pending)

    def _log_train(self, info: StepInfo, window: Window) -> None:
        mean = window.mean()
        if mean is None:
            return
        mean["epoch"] = info.step / self.steps_per_epoch
        self._last_train = mean
        if self.logger:
            self.logger.write(info.step, "train", mean)
        self._progress.show(mean, mean["tokens_per_s"])
        window.reset()

    def hooks(self) -> Hooks:
        """Progress, logging every log_every steps (and at the end), evaluation every
        eval_every, checkpoints every checkpoint_every; the last two pause the throughput."""
        c, window, hooks = self.cfg, Window(), Hooks()
        hooks.add(window.add, every=1)
        hooks.add(lambda info: self._progress.update(), every=1)
        hooks.add(lambda info: self._log_train(info, window), every=c.log_every, at_end=True)
        hooks.add(lambda info: self._eval_and_log(info.step), every=c.eval_every,
                  needs_state=True, pauses=window)
        hooks.add(lambda info: self._save(info.step), every=c.checkpoint_every,
                  needs_state=True, pauses=window)
        return hooks

    def _status(self, status: str, reason: str = "", step: int | None = None) -> None:
        if self.is_main:
            with contextlib.suppress(OSError):  # a full disk: the error itself says more
                run_status.write(self.workdir, status, self.step if step is None else step,
                                 self.total_steps, reason)

    def train(self) -> dict[str, Any]:
        """Run the loop; the workdir's writer lock is released at the end, however it ends."""
        warning = self._stop.install()
        if warning:
            self.note(f"warning: {warning}")
        self._progress = metrics_log.Progress(self.total_steps, self.start_step, self.is_main)
        launch_t0 = time.time()
        self._status(run_status.RUNNING)
        try:
            try:
                result = self._loop()
            except OSError as e:  # a full disk under metrics.jsonl, a manifest, ...
                raise CheckpointError(
                    f"could not write to {self.workdir} at step {self.step} ({e}); the run "
                    f"stopped. {self.checkpointer.last_good_text()} Fix the cause (e.g. free "
                    "disk space) and re-run the same command to resume.") from None
            result["wall_time_s"] = time.time() - launch_t0
            if self.is_main:
                (self.workdir / metrics_log.FINAL_METRICS_FILE).write_text(
                    json.dumps(result, indent=2) + "\n")
        except BaseException as e:
            self._status(run_status.FAILED, f"{type(e).__name__}: {errors.one_line(e)[:500]}")
            raise
        else:
            self._status(run_status.PREEMPTED if self.interrupted else run_status.FINISHED,
                         self.interrupted or "")
        finally:
            self._progress.close()
            self._stop.uninstall()
            try:  # a save that failed in the background is raised (or, if failing, said)
                self.checkpointer.close(failing=sys.exc_info()[1])
            finally:
                if self.logger:
                    self.logger.close()
                self.spec.release()
        return result

    def _loop(self) -> dict[str, Any]:
        n_eval = 0 if self.data.eval is None else len(self.data.eval)
        self.note(f"model: {self.model_source}, {self.model_config.num_hidden_layers} layers, "
                  f"{self.model_config.num_params() / 1e6:.2f}M params; exits {self.exits} "
                  f"(eval {self.eval_exits}); {len(self.data.train)} train examples "
                  f"({self.steps_per_epoch} steps/epoch), {n_eval} eval; steps {self.step} -> "
                  f"{self.total_steps}; mesh {dict(self.mesh.shape)}; "
                  f"{self.process_count} process(es)")
        if self.cfg.eval_at_start and self.step == 0:
            self._eval_and_log(0)
        hooks = self.hooks()
        for info in self.train_steps(hooks):
            hooks.run(info, self.total_steps)
        self._save(self.step)
        self.checkpointer.wait()
        return self._finish(self.step)

    def _finish(self, step: int) -> dict[str, Any]:
        result: dict[str, Any] = {
            "step": step, "total_steps": self.total_steps, "exits": list(self.exits),
            "eval_exits": list(self.eval_exits),
            "num_layers": self.model_config.num_hidden_layers, "interrupted": self.interrupted,
        }
        if self.interrupted:
            self.note(f"stopped by {self.interrupted} at step {step}; checkpoint saved in "
                      f"{self.checkpointer.directory}. Re-run the same command to resume.")
            result["train"] = self._last_train
            return result
        final_eval = None
        if self._last_eval is not None and self._last_eval[0] == step:
            final_eval = self._last_eval[1]
        elif self.eval_iter is not None:
            final_eval = self._eval_and_log(step)
        last_train = self._last_train
        if not last_train and self.is_main:  # nothing trained in this launch (resumed at end)
            rows = metrics_log.read_metrics(self.workdir, "train")
            last_train = rows[-1] if rows else {}
        result["eval"] = final_eval
        result["train"] = {k: v for k, v in last_train.items() if k not in ("step", "split")}
        if self.is_main:
            table = self.exit_report.write_final(step, final_eval, last_train)
            self._progress.close()
            print("\n" + table, flush=True)
        return result
