"""`python -m sorted_jax.train --config=configs/soft_7b.py --workdir=DIR`: SoFT / SFT training.

    python -m sorted_jax.train --config=configs/tiny.py --workdir=/tmp/soft_tiny
    python -m sorted_jax.train --config=configs/soft_7b.py --workdir=/ckpt/soft7b \\
        --config.init_from=/models/llama2-7b --config.optim.lr=1e-5 --config.exits=12,20,32

Fields: `sorted_jax.train_config.default_config`. Overrides are `--config.a.b=value`; an unknown
key fails with the list of known ones. Re-running a command on a workdir that has checkpoints
resumes that run (params, optimizer state, step, data position); `init_from` instead loads base
weights into a fresh run (new optimizer, step 0).

Workdir:

    WORKDIR/config.json            the model config (HF style)
    WORKDIR/train_config.json      the full training config of the latest launch
    WORKDIR/tokenizer/             the tokenizer files
    WORKDIR/checkpoints/<step>/    Orbax: state {params, opt_state, step}, data, meta
    WORKDIR/metrics.jsonl          one JSON line per train log / eval (append-only)
    WORKDIR/tensorboard/           TensorBoard events (tensorboardX)
    WORKDIR/exit_table.md          per-exit held-out loss / perplexity / accuracy at the end
    WORKDIR/final_metrics.json
    WORKDIR/exit_loss.png          held-out loss per exit over training

SIGTERM / SIGINT: the step in flight finishes, a checkpoint is written and the process exits 0
(a second SIGINT aborts). A non-finite loss stops the run naming the step, without saving the
bad state: the last checkpoint on disk is the last good one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from sorted_jax import metrics_log, model_io, modeling, reports, soft
from sorted_jax import plan as planner
from sorted_jax.checkpoint import Checkpointer, CheckpointError
from sorted_jax.config import PRESETS, LlamaConfig, preset
from sorted_jax.data import (
    TEMPLATES,
    DataError,
    DataIterator,
    EvalIterator,
    SourceError,
    Tokenizer,
    holdout_split,
    load_tokenizer,
    open_records,
    save_tokenizer_files,
    tokenize_records,
)
from sorted_jax.errors import NonFiniteLossError, TrainConfigError, run_cli
from sorted_jax.modeling import DTYPES
from sorted_jax.sharding import MeshError, check_batch_size, make_mesh, rules_from_config
from sorted_jax.train_step import (
    SoftSteps,
    TrainState,
    make_optimizer,
    sum_exit_sums,
    to_global_batch,
)

TRAIN_CONFIG_FILE = "train_config.json"
TOKENIZER_DIR = "tokenizer"
MODEL_OVERRIDES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
# Fields that fix the shapes of the weights: they must agree with weights being loaded.
ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "dim_per_head", "tie_word_embeddings")
SCHEDULES = ("cosine", "linear", "constant")


# ---------------------------------------------------------------------------------------------
# command line


def _flag_values(argv: Sequence[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    # sys_argv: config_flags defines one flag per override it finds in these args.
    config_flags.DEFINE_config_file(
        "config", None, "training config file, e.g. configs/tiny.py", flag_values=fv,
        lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs); re-run to resume",
                        flag_values=fv)
    return fv


def _override_keys(argv: Sequence[str]) -> list[str]:
    return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def _unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str | None:
    """A clear message if `key` ("config.optim.lrr") is not a field of `config`, else None."""
    node: Any = config
    parts = key.split(".")[1:]
    for i, part in enumerate(parts):
        if isinstance(node, ml_collections.ConfigDict) and part in node:
            node = node[part]
            continue
        where = ".".join(["config", *parts[:i]])
        if not isinstance(node, ml_collections.ConfigDict):
            return f"unknown config key '{key}': '{where}' is a value, not a group"
        known = sorted(node.keys())
        close = difflib.get_close_matches(part, known, n=1)
        hint = f" Did you mean '{where}.{close[0]}'?" if close else ""
        return (f"unknown config key '{key}'.{hint} Fields of '{where}': {', '.join(known)} "
                "(see sorted_jax/train_config.py)")
    return None


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
    """(config with overrides applied, workdir) from `argv` (argv[0] is the program name)."""
    argv = list(argv)
    fv = _flag_values(argv)
    try:
        rest = fv(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        # ml_collections reports an unknown override as a bare KeyError: find it and explain.
        plain = [a for a in argv if not a.startswith("--config.")]
        base = _flag_values(plain)
        try:
            base(plain)
            config = base.config
        except Exception:  # the config file itself is broken: its own message is the best
            config = None
        if config is not None:
            for key in _override_keys(argv):
                msg = _unknown_key_message(config, key)
                if msg:
                    raise TrainConfigError(msg) from None
        raise TrainConfigError(f"bad command line: {e}") from None
    if len(rest) > 1:
        raise TrainConfigError(f"unexpected arguments {rest[1:]}; use --config=... "
                               "--workdir=... [--config.key=value ...]")
    if fv.config is None:
        raise TrainConfigError("--config is required, e.g. --config=configs/tiny.py")
    if not fv.workdir:
        raise TrainConfigError("--workdir is required: where checkpoints and logs go")
    return fv.config, fv.workdir


# ---------------------------------------------------------------------------------------------
# distributed


def init_distributed(d: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize` from config; must run before anything touches devices."""
    if not d.enabled or jax.distributed.is_initialized():
        return
    if d.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    kwargs: dict[str, Any] = {"initialization_timeout": int(d.initialization_timeout)}
    if d.coordinator_address:
        kwargs["coordinator_address"] = d.coordinator_address
    if d.num_processes > 0:
        kwargs["num_processes"] = int(d.num_processes)
    if d.process_id >= 0:
        kwargs["process_id"] = int(d.process_id)
    jax.distributed.initialize(**kwargs)


# ---------------------------------------------------------------------------------------------
# config resolution (no devices, nothing compiled)


def _check_static(c: ml_collections.ConfigDict) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise TrainConfigError(msg)

    for name in ("batch_size", "grad_accum", "log_every", "loss_rows_per_chunk"):
        need(int(c[name]) >= 1, f"{name} must be >= 1, got {c[name]}")
    for name in ("num_steps", "eval_every", "eval_batches", "eval_batch_size",
                 "checkpoint_every", "keep_checkpoints"):
        need(int(c[name]) >= 0, f"{name} must be >= 0, got {c[name]}")
    need(c.max_len >= 2, f"max_len must be >= 2, got {c.max_len}")
    need(c.num_steps > 0 or c.epochs > 0, "set num_steps > 0 or epochs > 0")
    need(c.batch_size % c.grad_accum == 0,
         f"batch_size={c.batch_size} is not divisible by grad_accum={c.grad_accum}")
    for name in ("dtype", "param_dtype"):
        need(c[name] in DTYPES, f"{name} must be one of {sorted(DTYPES)}, got {c[name]!r}")
    need(c.attention_impl in modeling.ATTENTION_IMPLEMENTATIONS,
         f"attention_impl must be one of {modeling.ATTENTION_IMPLEMENTATIONS}, "
         f"got {c.attention_impl!r}")
    need(c.remat_policy in modeling.REMAT_POLICY_NAMES,
         f"remat_policy must be one of {modeling.REMAT_POLICY_NAMES}, got {c.remat_policy!r}")
    need(c.optim.schedule in SCHEDULES,
         f"optim.schedule must be one of {SCHEDULES}, got {c.optim.schedule!r}")
    need(c.optim.lr > 0, f"optim.lr must be > 0, got {c.optim.lr}")
    need(c.data.template in TEMPLATES,
         f"data.template must be one of {sorted(TEMPLATES)}, got {c.data.template!r}")
    need(len(tuple(c.mesh.shape)) == 3,
         f"mesh.shape needs 3 entries (data, fsdp, tensor), got {tuple(c.mesh.shape)} (a "
         "--config.mesh.shape override given twice is concatenated by ml_collections)")
    need(isinstance(c.exits, str) and c.exits.strip() != "",
         "exits is empty: give layer numbers like '12,16,20', 'default', 'all' or 'last'")
    if c.model.preset:
        need(c.model.preset in PRESETS,
             f"unknown model.preset {c.model.preset!r}; known: {', '.join(PRESETS)}")


def _arch_diff(a: LlamaConfig, b: LlamaConfig) -> list[str]:
    return [f"{f}: {getattr(a, f)} vs {getattr(b, f)}" for f in ARCH_FIELDS
            if getattr(a, f) != getattr(b, f)]


def requested_model_config(c: ml_collections.ConfigDict) -> LlamaConfig | None:
    """The preset with its overrides, or None when model.preset is empty."""
    overrides = {k: int(c.model[k]) for k in MODEL_OVERRIDES if int(c.model[k])}
    if not c.model.preset:
        if overrides:
            raise TrainConfigError(f"model overrides {overrides} need a model.preset")
        return None
    return preset(c.model.preset).replace(**overrides)


def resolve_model_config(c: ml_collections.ConfigDict, workdir: Path,
                         resuming: bool) -> tuple[LlamaConfig, str]:
    """(model config, where it came from): the run's own (resume) > init_from's > the preset."""
    wanted = requested_model_config(c)
    if resuming:
        source, loaded = f"{workdir / model_io.CONFIG_FILE} (resuming)", model_io.load_config(
            workdir)
    elif c.init_from:
        model_io.require_filesystem_path(c.init_from, "init_from")
        if not Path(c.init_from).exists():
            raise TrainConfigError(f"init_from={c.init_from!r} does not exist")
        source, loaded = f"init_from={c.init_from}", model_io.load_config(c.init_from)
    else:
        if wanted is None:
            raise TrainConfigError("model.preset is empty and there is no init_from to take the "
                                   "model from: set one of them")
        return wanted, f"preset {c.model.preset!r}"
    if wanted is not None:
        diff = _arch_diff(wanted, loaded)
        if diff:
            raise TrainConfigError(
                f"the model of {source} does not match model.preset={c.model.preset!r} with its "
                f"overrides ({'; '.join(diff)}); set --config.model.preset= (empty) to take the "
                "architecture from the weights, or fix the preset")
        if c.model.max_position_embeddings:
            loaded = loaded.replace(max_position_embeddings=int(c.model.max_position_embeddings))
    return loaded, source


def _tokenizer_spec(c: ml_collections.ConfigDict, workdir: Path, resuming: bool) -> str:
    if c.data.tokenizer:
        return c.data.tokenizer
    candidates = [workdir / TOKENIZER_DIR] if resuming else []
    if c.init_from:
        candidates += [Path(c.init_from), Path(c.init_from) / TOKENIZER_DIR]
    for cand in candidates:
        if model_io.find_tokenizer_files(cand):  # the builtin marker file is one of them
            return str(cand)
    where = (f"no tokenizer files were found in {', '.join(str(x) for x in candidates)}"
             if candidates else "init_from is not set")
    raise TrainConfigError(
        f"data.tokenizer is empty and {where}; set --config.data.tokenizer to 'builtin', a "
        "SentencePiece .model file (LLaMA-2: the base model's tokenizer.model) or a tokenizer dir")


def _parse_floats(text: str, name: str) -> list[float] | None:
    if not text.strip():
        return None
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise TrainConfigError(f"{name} must be comma-separated numbers, got {text!r}") from None


def _parse_ints(text: str, name: str) -> list[int] | None:
    values = _parse_floats(text, name)
    if values is None:
        return None
    if any(v != int(v) for v in values):
        raise TrainConfigError(f"{name} must be integers, got {text!r}")
    return [int(v) for v in values]


def _read_records(spec: str, split: str, c: ml_collections.ConfigDict, what: str) -> list:
    try:
        return open_records(spec, split, data_dir=c.data.tfds_data_dir or None,
                            seed=c.data.seed)
    except SourceError as e:
        raise e.prefixed(f"{what}=") from e


def _latest_step(workdir: Path) -> int | None:
    """The last finished checkpoint step of a workdir, or None for a fresh run."""
    steps = model_io.workdir_steps(workdir)
    if steps and not (workdir / model_io.CONFIG_FILE).is_file():
        raise TrainConfigError(f"{workdir} has checkpoints but no {model_io.CONFIG_FILE}: it "
                               "cannot be resumed; use another workdir")
    return steps[-1] if steps else None


@dataclasses.dataclass
class RunData:
    train: Any  # TokenizedDataset
    eval: Any | None
    train_records: int
    eval_records: int


def load_data(c: ml_collections.ConfigDict, tokenizer: Tokenizer) -> RunData:
    records = _read_records(c.data.train, c.data.train_split, c, "data.train")
    if c.data.max_records:
        records = records[:c.data.max_records]
    eval_records = None
    if c.data.eval_holdout > 0:
        try:
            records, eval_records = holdout_split(records, c.data.eval_holdout, c.data.seed)
        except DataError as e:
            raise e.prefixed("data.eval_holdout: ") from None
    elif c.data.eval == "none":
        eval_records = None
    elif c.data.eval:
        eval_records = _read_records(c.data.eval, c.data.eval_split, c, "data.eval")
    elif c.data.train == "builtin" or c.data.train.startswith("tfds:"):
        eval_records = _read_records(c.data.train, c.data.eval_split, c, "data.eval")
    train = tokenize_records(records, tokenizer, c.max_len, c.data.template)
    if len(train) == 0:
        raise TrainConfigError(f"data.train={c.data.train!r}: no record fits max_len="
                               f"{c.max_len} (every prompt is too long)")
    ev = None
    if eval_records:
        ev = tokenize_records(eval_records, tokenizer, c.max_len, c.data.template)
        ev = ev if len(ev) else None
    return RunData(train, ev, len(records), len(eval_records or []))


# ---------------------------------------------------------------------------------------------
# the trainer


def _host(tree: Any) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def _is_finite(metrics: Mapping[str, float]) -> bool:
    return all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm") if k in metrics)


class Trainer:
    """Everything a run needs, validated and built in `__init__`; `train()` runs the loop.

    Construction order: static config checks, model config, exits, mesh and batch sizes,
    tokenizer and data (all before anything is compiled), then the jitted steps and the train
    state (restored from the workdir, loaded from init_from, or freshly initialised).
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
        c = self.cfg = config
        self.workdir = model_io.require_filesystem_path(workdir, "--workdir").absolute()
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.is_main = self.process_index == 0
        _check_static(c)

        self.resume_step = _latest_step(self.workdir)
        resuming = self.resume_step is not None
        self.model_config, self.model_source = resolve_model_config(c, self.workdir, resuming)
        mc = self.model_config
        self.exits, self.exit_weights = soft.resolve_exit_set(
            c.exits, _parse_floats(c.exit_weights, "exit_weights"), mc.num_hidden_layers)
        self.eval_exits = (soft.resolve_exits(c.eval_exits, mc.num_hidden_layers)
                           if c.eval_exits.strip() else self.exits)
        if c.max_len > mc.max_position_embeddings:
            raise TrainConfigError(f"max_len={c.max_len} exceeds the model's "
                                   f"max_position_embeddings={mc.max_position_embeddings}")

        # devices: mesh and batch sizes
        self.mesh = make_mesh(tuple(c.mesh.shape))
        self.rules = rules_from_config(c.mesh.rules)
        check_batch_size(c.batch_size, self.mesh, self.rules, c.grad_accum)
        if c.batch_size % self.process_count:
            raise TrainConfigError(f"batch_size={c.batch_size} is not divisible by the "
                                   f"{self.process_count} processes")
        self.eval_batch_size = c.eval_batch_size or c.batch_size // c.grad_accum
        try:
            check_batch_size(self.eval_batch_size, self.mesh, self.rules)
        except MeshError as e:
            raise e.prefixed("eval_batch_size: ") from None
        if self.eval_batch_size % self.process_count:
            raise TrainConfigError(f"eval batch size {self.eval_batch_size} is not divisible by "
                                   f"the {self.process_count} processes")

        # tokenizer and data
        self.tokenizer_spec = _tokenizer_spec(c, self.workdir, resuming)
        self.tokenizer = load_tokenizer(self.tokenizer_spec)
        if self.tokenizer.vocab_size > mc.vocab_size:
            raise TrainConfigError(
                f"the tokenizer {self.tokenizer_spec!r} has {self.tokenizer.vocab_size} ids but "
                f"the model's vocab_size is {mc.vocab_size}: ids past the embedding would be "
                "silently clamped; use a matching tokenizer or set model.vocab_size")
        self.data = load_data(c, self.tokenizer)
        buckets = _parse_ints(c.data.buckets, "data.buckets")
        try:
            self.train_iter = DataIterator(
                self.data.train, c.batch_size, seed=c.seed, shuffle=c.data.shuffle,
                buckets=buckets, process_index=self.process_index,
                process_count=self.process_count)
            self.eval_iter = None if self.data.eval is None else EvalIterator(
                self.data.eval, self.eval_batch_size, buckets=buckets,
                process_index=self.process_index, process_count=self.process_count)
        except DataError as e:
            raise e.prefixed("data: ") from None
        self.steps_per_epoch = self.train_iter.steps_per_epoch
        self.total_steps = int(c.num_steps) if c.num_steps > 0 else max(
            1, math.ceil(c.epochs * self.steps_per_epoch))
        warmup = (c.optim.warmup_steps if c.optim.warmup_steps >= 0
                  else round(c.optim.warmup_ratio * self.total_steps))

        # model and jitted steps (traced, not compiled yet)
        self.model = modeling.make_model(
            mc, dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype],
            attention_impl=c.attention_impl, remat_policy=c.remat_policy)
        tx, schedule = make_optimizer(
            lr=c.optim.lr, total_steps=self.total_steps, warmup_steps=warmup,
            schedule=c.optim.schedule, end_lr_ratio=c.optim.end_lr_ratio,
            weight_decay=c.optim.weight_decay, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
            clip_norm=c.optim.clip_norm or None)
        self.steps = SoftSteps(self.model, self.exits, tx, self.mesh, self.rules,
                               exit_weights=list(self.exit_weights), grad_accum=c.grad_accum,
                               rows_per_chunk=c.loss_rows_per_chunk, schedule=schedule)
        self.eval_steps = self.steps if self.eval_exits == self.exits else SoftSteps(
            self.model, self.eval_exits, tx, self.mesh, self.rules,
            rows_per_chunk=c.loss_rows_per_chunk)
        self._count_tokens = jax.jit(lambda m: jnp.sum(m.astype(jnp.int32)))
        self._params_finite = jax.jit(lambda p: jnp.all(jnp.asarray(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])))

        self._progress: metrics_log.Progress | None = None
        self._prepare_workdir()
        self.checkpointer = Checkpointer(self.workdir, keep=c.keep_checkpoints,
                                         async_save=c.async_checkpointing)
        self.state, self.start_step = self._initial_state()
        self.logger = metrics_log.MetricsLogger(
            self.workdir, tensorboard=c.tensorboard) if self.is_main else None
        self._stop_signal: int | None = None
        self._last_eval: tuple[int, dict[str, float]] | None = None
        self._eval_points: dict[int, Mapping[str, Any]] | None = None  # step -> eval metrics

    # -- setup helpers -----------------------------------------------------------------------
    def note(self, text: str) -> None:
        """A line above the progress bar (process 0 only)."""
        if self.is_main:
            if self._progress is not None:
                self._progress.write(text)
            else:
                print(text, flush=True)

    def _prepare_workdir(self) -> None:
        if not self.is_main:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_file = self.workdir / model_io.CONFIG_FILE
        if self.resume_step is None or not config_file.is_file():
            self.model_config.to_json_file(config_file)
        (self.workdir / TRAIN_CONFIG_FILE).write_text(self.cfg.to_json_best_effort(indent=2))
        tok_dir = self.workdir / TOKENIZER_DIR
        if Path(self.tokenizer_spec).absolute() != tok_dir.absolute():
            save_tokenizer_files(self.tokenizer_spec, tok_dir)

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
            self._warn_changed(meta.get("train_config", {}))
            self.note(f"resuming {self.workdir} from step {self.resume_step} (data epoch "
                     f"{self.train_iter.epoch}, example {self.train_iter.index})"
                     + ("; init_from ignored" if c.init_from else ""))
            return state, self.resume_step
        if c.init_from:
            # Straight into the state's shardings: each process reads only its shards, so no
            # host ever holds a full copy of the model (7B fp32 is 27 GB per process otherwise).
            params, _, _ = model_io.load_params(c.init_from, dtype=c.param_dtype,
                                                shardings=self.steps.params_shardings)
            self.note(f"loaded weights from {c.init_from} (fresh optimizer, step 0)")
            return self.steps.state_from_params(params), 0
        return self.steps.init_state(jax.random.PRNGKey(c.seed)), 0

    def _warn_changed(self, saved: Mapping[str, Any]) -> None:
        now = json.loads(self.cfg.to_json_best_effort())
        changed = [k for k in ("exits", "seed", "batch_size", "max_len", "data", "model")
                   if k in saved and saved[k] != now.get(k)]
        if changed:
            self.note(f"warning: resuming with changed config fields {changed} (the checkpoint "
                     "was written with different values)")

    def meta(self, step: int) -> dict[str, Any]:
        return {
            "step": int(step),
            "total_steps": self.total_steps,
            "exits": list(self.exits),
            "eval_exits": list(self.eval_exits),
            "exit_weights": [float(w) for w in self.exit_weights],
            "model_config": self.model_config.to_hf_dict(),
            "model_source": self.model_source,
            "tokenizer": self.tokenizer_spec,
            "process_count": self.process_count,
            "train_config": json.loads(self.cfg.to_json_best_effort()),
            "time": time.time(),
        }

    # -- signals -----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum
        if signum == signal.SIGINT:  # a second Ctrl-C aborts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _stop_requested(self) -> bool:
        flag = self._stop_signal is not None
        if self.process_count > 1:  # every process must stop at the same step
            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag

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
            self._plot_history()[step] = metrics
            reports.plot_exit_losses(sorted(self._plot_history().items()),
                                         self.workdir / metrics_log.EXIT_PLOT_FILE)
        return metrics

    def _plot_history(self) -> dict[int, Mapping[str, Any]]:
        """Eval points of this workdir by step: earlier launches' read from metrics.jsonl once
        (a later line wins a step), this launch's added as they come."""
        if self._eval_points is None:
            rows = metrics_log.read_metrics(self.workdir, "eval")
            self._eval_points = {r["step"]: r for r in rows}
        return self._eval_points

    # -- the loop ----------------------------------------------------------------------------
    def _non_finite(self, what: str) -> None:
        last = self.checkpointer.latest_step()
        where = (f"The last good checkpoint is step {last} in {self.checkpointer.directory}."
                 if last is not None else "No checkpoint was written.")
        raise NonFiniteLossError(f"{what}; stopped without saving this state. {where}")

    def _save(self, step: int) -> None:
        if not bool(self._params_finite(self.state.params)):
            self._non_finite(f"the parameters became non-finite at step {step}")
        if self.checkpointer.save(step, self.state, self.train_iter.state_dict(),
                                  self.meta(step)):
            self.note(f"checkpoint: step {step}")

    def train(self) -> dict[str, Any]:
        handlers = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: no handlers
                pass
        self._progress = metrics_log.Progress(self.total_steps, self.start_step, self.is_main)
        launch_t0 = time.time()
        try:
            result = self._loop()
        finally:
            self._progress.close()
            for sig, old in handlers.items():
                signal.signal(sig, old)
            self.checkpointer.close()
            if self.logger:
                self.logger.close()
        result["wall_time_s"] = time.time() - launch_t0
        if self.is_main:
            (self.workdir / metrics_log.FINAL_METRICS_FILE).write_text(
                json.dumps(result, indent=2) + "\n")
        return result

    def _loop(self) -> dict[str, Any]:
        c = self.cfg
        step = self.start_step
        self.note(f"model: {self.model_source}, {self.model_config.num_hidden_layers} layers, "
                 f"{self.model_config.num_params() / 1e6:.2f}M params; exits {self.exits} "
                 f"(eval {self.eval_exits}); "
                 f"{len(self.data.train)} train examples ({self.steps_per_epoch} steps/epoch), "
                 f"{0 if self.data.eval is None else len(self.data.eval)} eval; "
                 f"steps {step} -> {self.total_steps}; mesh {dict(self.mesh.shape)}; "
                 f"{self.process_count} process(es)")
        if c.eval_at_start and step == 0:
            self._eval_and_log(0)

        window: list[dict[str, float]] = []
        window_tokens, window_t0, paused = 0, time.time(), 0.0
        last_train: dict[str, float] = {}
        pending = None  # (step, device metrics, device token count): fetched one step late
        interrupted = None

        def finish(p) -> None:
            nonlocal window_tokens
            s, m, n = p
            m, n = jax.device_get((m, n))  # one transfer for both
            host = _host(m)
            if not _is_finite(host):
                self._non_finite(f"non-finite loss at step {s} (loss={host.get('loss')}, "
                                 f"grad_norm={host.get('grad_norm')})")
            window.append(host)
            window_tokens += int(n)

        while step < self.total_steps:
            # Multi-process runs agree on stopping at log boundaries (a collective each step
            # would stall the device pipeline).
            check = self.process_count == 1 or step % c.log_every == 0
            if check and self._stop_requested():
                interrupted = signal.Signals(self._stop_signal or signal.SIGTERM).name
                break
            local = next(self.train_iter)
            batch = to_global_batch(local, self.steps.batch_shardings)
            self.state, metrics = self.steps.train_step(self.state, batch)
            step += 1
            tokens = self._count_tokens(batch["attention_mask"])
            if pending is not None:
                finish(pending)
            pending = (step, metrics, tokens)
            self._progress.update()
            at_log = step % c.log_every == 0
            at_eval = bool(c.eval_every) and step % c.eval_every == 0
            at_ckpt = bool(c.checkpoint_every) and step % c.checkpoint_every == 0
            if not (at_log or at_eval or at_ckpt or step == self.total_steps):
                continue
            finish(pending)
            pending = None
            if (at_log or step == self.total_steps) and window:
                elapsed = max(time.time() - window_t0 - paused, 1e-9)
                mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                mean["tokens_per_s"] = window_tokens / elapsed
                mean["steps_per_s"] = len(window) / elapsed
                mean["epoch"] = step / self.steps_per_epoch
                last_train = mean
                if self.logger:
                    self.logger.write(step, "train", mean)
                self._progress.show(mean, mean["tokens_per_s"])
                window, window_tokens, window_t0, paused = [], 0, time.time(), 0.0
            t0 = time.time()
            if at_eval:
                self._eval_and_log(step)
            if at_ckpt:
                self._save(step)
            paused += time.time() - t0
        if pending is not None:
            finish(pending)

        self._save(step)
        self.checkpointer.wait()
        result: dict[str, Any] = {
            "step": step, "total_steps": self.total_steps, "exits": list(self.exits),
            "eval_exits": list(self.eval_exits),
            "num_layers": self.model_config.num_hidden_layers, "interrupted": interrupted,
        }
        if interrupted:
            self.note(f"stopped by {interrupted} at step {step}; checkpoint saved in "
                     f"{self.checkpointer.directory}. Re-run the same command to resume.")
            result["train"] = last_train
            return result

        final_eval = None
        if self._last_eval is not None and self._last_eval[0] == step:
            final_eval = self._last_eval[1]
        elif self.eval_iter is not None:
            final_eval = self._eval_and_log(step)
        if not last_train and self.is_main:  # nothing trained in this launch (resumed at end)
            rows = metrics_log.read_metrics(self.workdir, "train")
            last_train = rows[-1] if rows else {}
        result["eval"] = final_eval
        result["train"] = {k: v for k, v in last_train.items() if k not in ("step", "split")}
        if self.is_main:
            table = reports.exit_table(
                final_eval, last_train, num_layers=self.model_config.num_hidden_layers,
                title=f"Per-exit metrics at step {step} (exits {','.join(map(str, self.exits))}; "
                      "eval = held-out split)")
            (self.workdir / metrics_log.EXIT_TABLE_FILE).write_text(table)
            if final_eval is None:  # otherwise the eval at this step has just plotted
                reports.plot_exit_losses(sorted(self._plot_history().items()),
                                             self.workdir / metrics_log.EXIT_PLOT_FILE)
            self._progress.close()
            print("\n" + table, flush=True)
        return result


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Train (or resume) in `workdir`; returns the final metrics."""
    init_distributed(config.distributed)
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    return Trainer(config, workdir).train()


def plan_memory(c: ml_collections.ConfigDict, device_memory: str | None = None) -> Any:
    """`--plan`: per-device memory of this config's train step, without allocating the model."""
    _check_static(c)
    mc = requested_model_config(c)
    if mc is None:
        if not c.init_from:
            raise TrainConfigError("--plan needs model.preset or init_from for the model shape")
        mc = model_io.load_config(c.init_from)
    exits = soft.resolve_exits(c.exits, mc.num_hidden_layers)
    mesh = make_mesh(tuple(c.mesh.shape))
    rules = rules_from_config(c.mesh.rules)
    check_batch_size(c.batch_size, mesh, rules, c.grad_accum)
    model = modeling.make_model(mc, dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype],
                                attention_impl=c.attention_impl, remat_policy=c.remat_policy)
    mu_dtype = DTYPES[c.param_dtype] if c.param_dtype != "float32" else None
    tx, _ = make_optimizer(lr=c.optim.lr, total_steps=1000, mu_dtype=mu_dtype,
                           clip_norm=c.optim.clip_norm or None)
    steps = SoftSteps(model, exits, tx, mesh, rules, grad_accum=c.grad_accum,
                      rows_per_chunk=c.loss_rows_per_chunk)
    gib = None
    if device_memory:
        key = device_memory.lower()
        try:
            gib = planner.DEVICE_MEMORY_GIB[key] if key in planner.DEVICE_MEMORY_GIB else float(
                key)
        except ValueError:
            raise TrainConfigError(
                f"--plan_device_memory={device_memory!r}: give GiB or one of "
                f"{', '.join(planner.DEVICE_MEMORY_GIB)}") from None
    return planner.plan_steps(steps, (c.batch_size, c.max_len), gib), mc, exits


def _pop_plan_flags(argv: list[str]) -> tuple[list[str], dict[str, Any] | None]:
    """Strip `--plan`, `--plan_devices=N`, `--plan_device_memory=X`, `--plan_json` from argv."""
    opts: dict[str, Any] = {}
    rest = []
    for a in argv:
        name, _, value = a.partition("=")
        if name in ("--plan", "--plan_json"):
            opts[name[2:]] = True
        elif name in ("--plan_devices", "--plan_device_memory"):
            opts[name[2:]] = value
        else:
            rest.append(a)
    if not opts:
        return rest, None
    if not any(a.startswith("--workdir") for a in rest):
        rest.append("--workdir=unused-by-plan")
    return rest, opts


def _run_plan(config: ml_collections.ConfigDict, argv: list[str], opts: dict[str, Any]) -> int:
    want = int(opts.get("plan_devices") or 0)
    if want and want != jax.device_count():
        # Plan for N devices on this host: a child process with N fake CPU devices.
        child = [a for a in argv[1:] if not a.startswith("--plan_devices")]
        child += ["--plan_json", f"--plan_devices={want}"]
        if opts.get("plan_device_memory"):
            child.append(f"--plan_device_memory={opts['plan_device_memory']}")
        result = planner.plan_in_subprocess(child, want)
        print(result["table"])
        for tip in result["suggestions"]:
            print(f"  - {tip}")
        return 0
    p, mc, exits = plan_memory(config, opts.get("plan_device_memory"))
    tips = planner.suggestions(p, config.remat_policy, config.param_dtype)
    header = (f"plan: {mc.num_params() / 1e9:.2f}B params, exits {list(exits)}, batch "
              f"{config.batch_size} x {config.max_len} (grad_accum {config.grad_accum}), remat "
              f"{config.remat_policy}, {config.dtype} compute / {config.param_dtype} params, "
              f"{p.devices} device(s)")
    table = header + "\n" + p.table()
    if opts.get("plan_json"):
        print(json.dumps({**p.to_json(), "table": table, "suggestions": tips}))
    else:
        print(table)
        for tip in tips:
            print(f"  - {tip}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    argv, plan_opts = _pop_plan_flags(argv)

    def command() -> int:
        config, workdir = parse_args(argv)
        if plan_opts is not None:
            return _run_plan(config, argv, plan_opts)
        run(config, workdir)
        return 0

    try:
        return run_cli("sorted_jax.train", command)
    except NonFiniteLossError as e:
        print(f"sorted_jax.train: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
