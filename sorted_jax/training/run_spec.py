"""A training run, resolved: the command line parsed, the config validated and resolved into one
frozen, device-free `RunSpec`.

    config, workdir = parse_args(sys.argv)   # the schema is `train_config.default_config`
    spec = resolve(config, workdir)          # every check that needs no device; nothing compiled

`resolve` checks every field, claims the workdir, picks the model config (the run's own when
resuming, else `init_from`'s, else the preset with its overrides), the exit set and its weights,
the eval exits, the tokenizer and the step to resume from. What needs devices (the mesh, batch
sizes per process) or data (steps per epoch) is the trainer's; the data is `run_data`'s, and
what a finished run recorded is read back by `run_settings`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from sorted_jax.core.errors import TrainConfigError, UserError
from sorted_jax.data import (
    TEMPLATE_NAMES,
    DataError,
    Tokenizer,
    save_tokenizer_files,
    spec_kind,
)
from sorted_jax.data.chat import require_chat_template
from sorted_jax.data.templates import CHAT
from sorted_jax.io import destinations, model_io
from sorted_jax.io.run_settings import TRAIN_CONFIG_FILE
from sorted_jax.io.writer_lock import WriterLock
from sorted_jax.model import modeling
from sorted_jax.model.config import PRESETS, LlamaConfig, preset
from sorted_jax.model.exit_adapters import INITS
from sorted_jax.model.modeling import DTYPES
from sorted_jax.objective import soft
from sorted_jax.parallel.sharding import Rules, rules_from_config
from sorted_jax.training import checkpoint_integrity, lora_run
from sorted_jax.training.config_checks import check_ranges
from sorted_jax.training.lora_run import lora_spec
from sorted_jax.training.run_args import parse_args

__all__ = ["ARCH_FIELDS", "COMMAND", "MODEL_OVERRIDES", "SCHEDULES", "TOKENIZER_DIR", "RunSpec",
           "check_static", "claim", "claim_workdir", "is_train_workdir", "mu_dtype_of",
           "parse_args", "parse_floats", "parse_ints", "requested_model_config", "resolve",
           "resolve_model_config", "resume_choice", "tokenizer_spec"]

COMMAND = "sorted_jax.train"
TOKENIZER_DIR = "tokenizer"
MODEL_OVERRIDES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
# Fields that fix the shapes of the weights: they must agree with weights being loaded.
ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "dim_per_head", "tie_word_embeddings")
SCHEDULES = ("cosine", "linear", "constant")


# ---------------------------------------------------------------------------------------------
# validation and resolution (no devices, nothing compiled)


EXIT_ADAPTER_KINDS = ("none", "layer")


def check_static(c: ml_collections.ConfigDict) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise TrainConfigError(msg)

    check_ranges(c)  # every number of the schema in its range, the error naming its field
    for name in ("batch_size", "grad_accum", "log_every", "loss_rows_per_chunk"):
        need(int(c[name]) >= 1, f"{name} must be >= 1, got {c[name]}")
    for name in ("num_steps", "eval_every", "eval_batches", "eval_batch_size",
                 "checkpoint_every", "keep_checkpoints"):
        need(int(c[name]) >= 0, f"{name} must be >= 0, got {c[name]}")
    need(int(c.resume_step) >= -1,
         f"resume_step must be -1 (the newest intact checkpoint) or a step, got {c.resume_step}")
    need(c.max_len >= 2, f"max_len must be >= 2, got {c.max_len}")
    need(c.num_steps > 0 or c.epochs > 0, "set num_steps > 0 or epochs > 0")
    need(c.batch_size % c.grad_accum == 0,
         f"batch_size={c.batch_size} is not divisible by grad_accum={c.grad_accum}")
    for name in ("dtype", "param_dtype"):
        need(c[name] in DTYPES, f"{name} must be one of {sorted(DTYPES)}, got {c[name]!r}")
    need(0 <= c.exit_curriculum.hold <= 1 and 0 <= c.exit_curriculum.ramp <= 1
         and c.exit_curriculum.hold + c.exit_curriculum.ramp <= 1,
         "exit_curriculum.hold and .ramp are fractions of the run's steps in [0, 1] with "
         f"hold + ramp <= 1, got hold={c.exit_curriculum.hold}, ramp={c.exit_curriculum.ramp}")
    need(c.distill_weight >= 0, f"distill_weight must be >= 0, got {c.distill_weight}")
    need(math.isfinite(c.anchor_weight) and c.anchor_weight >= 0,
         f"anchor_weight must be >= 0 (0 = off), got {c.anchor_weight}")
    need(c.exit_adapters in EXIT_ADAPTER_KINDS,
         f"exit_adapters must be one of {EXIT_ADAPTER_KINDS}, got {c.exit_adapters!r}")
    need(c.exit_adapter_init in INITS,
         f"exit_adapter_init must be one of {INITS}, got {c.exit_adapter_init!r}")
    if c.anchor_weight > 0:
        teacher = str(c.anchor_teacher).strip()
        need(teacher != "", "anchor_teacher is empty: give 'base' (init_from's weights) or the "
             "path of a model dir / training workdir")
        need(teacher != "base" or bool(c.init_from),
             "anchor_teacher='base' anchors to init_from's weights, but init_from is empty: set "
             "init_from, or anchor_teacher to a model dir / training workdir")
        need(teacher == "base" or Path(teacher).exists(),
             f"anchor_teacher={teacher!r} does not exist (a model dir or a training workdir)")
    if c.exit_adapters != "none":
        need(bool(c.init_from), f"exit_adapters={c.exit_adapters!r} trains adapters on a frozen "
             "trunk: set init_from to the trunk (a base model or a finished SFT run)")
    if lora_spec(c) is not None:
        need(c.exit_adapters == "none", "lora.rank > 0 and exit_adapters are two ways to keep "
             "the base frozen: use one of them")
    need(c.optim.mu_dtype == "" or c.optim.mu_dtype in DTYPES,
         f"optim.mu_dtype must be '' or one of {sorted(DTYPES)}, got {c.optim.mu_dtype!r}")
    need(c.attention_impl in modeling.ATTENTION_IMPLEMENTATIONS,
         f"attention_impl must be one of {modeling.ATTENTION_IMPLEMENTATIONS}, "
         f"got {c.attention_impl!r}")
    need(c.remat_policy in modeling.REMAT_POLICY_NAMES,
         f"remat_policy must be one of {modeling.REMAT_POLICY_NAMES}, got {c.remat_policy!r}")
    need(c.optim.schedule in SCHEDULES,
         f"optim.schedule must be one of {SCHEDULES}, got {c.optim.schedule!r}")
    need(c.optim.lr > 0, f"optim.lr must be > 0, got {c.optim.lr}")
    need(c.data.template in TEMPLATE_NAMES,
         f"data.template must be one of {sorted(TEMPLATE_NAMES)}, got {c.data.template!r}")
    need(len(tuple(c.mesh.shape)) == 3,
         f"mesh.shape needs 3 entries (data, fsdp, tensor), got {tuple(c.mesh.shape)} (a "
         "--config.mesh.shape override given twice is concatenated by ml_collections)")
    need(isinstance(c.exits, str) and c.exits.strip() != "",
         "exits is empty: give layer numbers like '12,16,20', 'default', 'all' or 'last'")
    if c.model.preset:
        need(c.model.preset in PRESETS,
             f"unknown model.preset {c.model.preset!r}; known: {', '.join(PRESETS)}")


def mu_dtype_of(c: ml_collections.ConfigDict) -> Any:
    """Adam's first-moment dtype (`optim.mu_dtype`; None = that of the fp32 master weights)."""
    return DTYPES[c.optim.mu_dtype] if c.optim.mu_dtype else None


def _arch_diff(a: LlamaConfig, b: LlamaConfig) -> list[str]:
    return [f"{f}: {getattr(a, f)} vs {getattr(b, f)}" for f in ARCH_FIELDS
            if getattr(a, f) != getattr(b, f)]


def requested_model_config(c: ml_collections.ConfigDict) -> LlamaConfig | None:
    """The preset with its overrides, or None when model.preset is empty."""
    overrides = {k: int(c.model[k]) for k in MODEL_OVERRIDES if int(c.model[k])}
    if not c.model.preset:
        if overrides:
            keys = tuple(f"model.{k}" for k in overrides)
            first = next(iter(overrides))
            raise TrainConfigError(
                f"model.preset is empty (the architecture then comes from init_from's "
                f"weights), but "
                f"{', '.join(f'model.{k}={v}' for k, v in overrides.items())} "
                f"{'is' if len(keys) == 1 else 'are'} set: overrides apply to a preset. Set "
                f"{'it' if len(keys) == 1 else 'them'} to 0 to take the architecture from the "
                f"weights (e.g. --config.model.{first}=0), or set model.preset", fields=keys)
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


def tokenizer_spec(c: ml_collections.ConfigDict, workdir: Path, resuming: bool) -> str:
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


def parse_floats(text: str, name: str) -> list[float] | None:
    if not text.strip():
        return None
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise TrainConfigError(f"{name} must be comma-separated numbers, got {text!r}") from None


def parse_ints(text: str, name: str) -> list[int] | None:
    values = parse_floats(text, name)
    if values is None:
        return None
    if any(v != int(v) for v in values):
        raise TrainConfigError(f"{name} must be integers, got {text!r}")
    return [int(v) for v in values]


def resume_choice(workdir: Path, requested: int = -1) -> tuple[int | None, str | None]:
    """(the checkpoint step to resume from, or None for a fresh run; a note when newer steps
    were passed over as damaged or diverged): `checkpoint_integrity.choose_resume_step`."""
    steps = model_io.workdir_steps(workdir)
    if steps and not (workdir / model_io.CONFIG_FILE).is_file():
        raise TrainConfigError(f"{workdir} has checkpoints but no {model_io.CONFIG_FILE}: it "
                               "cannot be resumed; use another workdir")
    if requested >= 0 and not steps:
        raise TrainConfigError(f"resume_step={requested}: {workdir} has no checkpoint to resume")
    return checkpoint_integrity.choose_resume_step(workdir, steps, requested)


# ---------------------------------------------------------------------------------------------
# the resolved spec


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything a run needs that neither devices nor the data size decide, checked."""

    config: ml_collections.FrozenConfigDict  # the full config, overrides applied
    workdir: Path  # absolute
    resume_step: int | None  # the checkpoint resumed from; None for a fresh run
    model_config: LlamaConfig
    model_source: str  # where the model config came from, for the log
    exits: tuple[int, ...]
    exit_weights: tuple[float, ...]
    eval_exits: tuple[int, ...]
    tokenizer_spec: str
    buckets: tuple[int, ...] | None  # padded sequence lengths; None = powers of two
    mesh_shape: tuple[int, int, int]
    rules: Rules
    resume_note: str | None = None  # newer checkpoints passed over, and why
    # the workdir's writer lock (process 0), held until `release()` or the process ends
    lock: WriterLock | None = dataclasses.field(default=None, compare=False, repr=False)

    def release(self) -> None:
        """Let another run write the workdir."""
        if self.lock is not None:
            self.lock.release()

    @property
    def resuming(self) -> bool:
        return self.resume_step is not None

    @property
    def eval_batch_size(self) -> int:
        c = self.config
        return int(c.eval_batch_size) or int(c.batch_size) // int(c.grad_accum)

    def total_steps(self, steps_per_epoch: int) -> int:
        c = self.config
        return int(c.num_steps) if c.num_steps > 0 else max(
            1, math.ceil(c.epochs * steps_per_epoch))

    def exit_curriculum_steps(self, total_steps: int) -> tuple[int, int]:
        """(hold, ramp) steps of the exit-weight curriculum (fractions of the run's steps)."""
        cur = self.config.exit_curriculum
        return round(cur.hold * total_steps), round(cur.ramp * total_steps)

    def warmup_steps(self, total_steps: int) -> int:
        o = self.config.optim
        return int(o.warmup_steps) if o.warmup_steps >= 0 else round(
            o.warmup_ratio * total_steps)

    def write_files(self) -> None:
        """The run's record in its workdir: the model config (kept when resuming), the full
        training config of this launch, the tokenizer files."""
        destinations.make_dirs(self.workdir)
        destinations.write_marker(self.workdir, COMMAND)  # first: the dir is a workdir now
        config_file = self.workdir / model_io.CONFIG_FILE
        if not self.resuming or not config_file.is_file():
            self.model_config.to_json_file(config_file)
        (self.workdir / TRAIN_CONFIG_FILE).write_text(self.config.to_json_best_effort(indent=2))
        tok_dir = self.workdir / TOKENIZER_DIR
        if Path(self.tokenizer_spec).absolute() != tok_dir.absolute():
            save_tokenizer_files(self.tokenizer_spec, tok_dir)

    def checkpoint_meta(self, step: int, total_steps: int, process_count: int) -> dict:
        """The `meta` item saved with each checkpoint."""
        return {
            "step": int(step), "total_steps": int(total_steps), "exits": list(self.exits),
            "eval_exits": list(self.eval_exits), "exit_weights": list(self.exit_weights),
            "model_config": self.model_config.to_hf_dict(), "model_source": self.model_source,
            "tokenizer": self.tokenizer_spec, "process_count": process_count,
            "train_config": json.loads(self.config.to_json_best_effort()), "time": time.time(),
        }

    def changed_fields(self, saved: Mapping[str, Any]) -> list[str]:
        """Top-level config fields that matter for a resumed run and differ from `saved` (the
        train config a checkpoint was written with)."""
        now = json.loads(self.config.to_json_best_effort())
        return [k for k in ("exits", "seed", "batch_size", "max_len", "data", "model", "lora")
                if k in saved and saved[k] != now.get(k)]

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        if self.config.data.template == CHAT:
            try:
                require_chat_template(tokenizer)
            except DataError as e:
                raise TrainConfigError(f"data.template='chat': {e}") from None
        mc = self.model_config
        if tokenizer.vocab_size > mc.vocab_size:
            raise TrainConfigError(
                f"the tokenizer {self.tokenizer_spec!r} has {tokenizer.vocab_size} ids but "
                f"the model's vocab_size is {mc.vocab_size}: ids past the embedding would be "
                "silently clamped; use a matching tokenizer or set model.vocab_size",
                fields=("data.tokenizer", "model.vocab_size"))


def is_train_workdir(path: Path) -> bool:
    """A workdir written before markers existed: a training config and no model dir's params."""
    return (path / TRAIN_CONFIG_FILE).is_file() and not (path / model_io.PARAMS_DIR).exists()


def claim_workdir(c: ml_collections.ConfigDict, workdir: str | Path,
                  lock: bool = True) -> destinations.Destination:
    """The workdir, refused unless it is new, empty or a training workdir (which resumes),
    not one of the run's inputs (init_from, data files, the tokenizer), and not being written
    by another run: with `lock`, its writer lock is taken (`destinations`)."""
    inputs = [c.init_from, c.data.tokenizer]
    inputs += [s for s in (c.data.train, c.data.eval) if s and spec_kind(s) == "file"]
    return destinations.claim_dir(workdir, flag="--workdir", command=COMMAND, inputs=inputs,
                                  resume=True, recognise=is_train_workdir, lock=lock)


def claim(config: ml_collections.ConfigDict, workdir: str | Path, *,
          lock: bool = True) -> destinations.Destination:
    """The first half of `resolve`: the config's own checks and the workdir's claim (with
    `lock`, its writer lock). No collective runs here (nothing Orbax), so in a multi-process
    run the processes can agree on it before going on (`distributed.on_every_process`)."""
    check_static(config)
    if lora_spec(config) is not None and not config.init_from:  # (not in check_static: --plan
        raise TrainConfigError(                                  # needs no weights)
            f"lora.rank={config.lora.rank} trains adapters on a frozen base: set init_from to "
            "it (a model dir, HF dir, GGUF file or workdir)")
    return claim_workdir(config, workdir, lock)


def resolve(config: ml_collections.ConfigDict, workdir: str | Path, *, lock: bool = True,
            claimed: destinations.Destination | None = None) -> RunSpec:
    """Validate `config` and resolve it for `workdir` (reads only config and tokenizer files).

    With `lock` (process 0 of a run; the others pass False) the workdir's writer lock is taken
    before the step to resume from is chosen, and held by the spec (`RunSpec.release`).
    `claimed`: the workdir already claimed (`claim`)."""
    c = config
    dest = claim(c, workdir, lock=lock) if claimed is None else claimed
    try:
        return _resolve(c, dest)
    except BaseException:
        dest.release()
        raise


def _resolve(c: ml_collections.ConfigDict, dest: destinations.Destination) -> RunSpec:
    wd = dest.path
    resume_step, resume_note = resume_choice(wd, int(c.resume_step))
    mc, source = resolve_model_config(c, wd, resume_step is not None)
    big_l = mc.num_hidden_layers
    text = c.exit_weights.strip()  # a scheme name, or numbers
    weights_spec = text if text[:1].isalpha() else parse_floats(text, "exit_weights")
    try:
        exits, weights = soft.resolve_exit_set(c.exits, weights_spec, big_l)
    except UserError as e:
        fields = ("exits", "exit_weights") if text else ("exits",)
        said = f"exits={c.exits!r}" + (f", exit_weights={text!r}" if text else "")
        raise TrainConfigError(f"{said}: {e} (model: {source})", fields=fields) from None
    try:
        eval_exits = soft.resolve_exits(c.eval_exits, big_l) if c.eval_exits.strip() else exits
    except UserError as e:
        raise TrainConfigError(f"eval_exits={c.eval_exits!r}: {e} (model: {source})",
                               fields=("eval_exits",)) from None
    if c.exit_adapters != "none" and resume_step is None:
        adapted = tuple(e for e in exits if e < big_l)
        if not adapted:
            raise TrainConfigError(f"exit_adapters={c.exit_adapters!r} needs exits below the last "
                                   f"layer ({big_l}), got exits={list(exits)}",
                                   fields=("exit_adapters", "exits"))
        mc = mc.replace(exit_adapters=adapted)
    lora_run.check_model(lora_spec(c), mc)
    if c.max_len > mc.max_position_embeddings:
        raise TrainConfigError(f"max_len={c.max_len} exceeds the model's "
                               f"max_position_embeddings={mc.max_position_embeddings}",
                               fields=("max_len",))
    buckets = parse_ints(c.data.buckets, "data.buckets")
    if buckets is not None and min(buckets, default=1) < 1:
        raise TrainConfigError(f"data.buckets must be positive lengths, got {c.data.buckets!r}",
                               fields=("data.buckets",))
    return RunSpec(
        config=ml_collections.FrozenConfigDict(c), workdir=wd, resume_step=resume_step,
        model_config=mc, model_source=source, exits=tuple(exits),
        exit_weights=tuple(float(w) for w in weights), eval_exits=tuple(eval_exits),
        tokenizer_spec=tokenizer_spec(c, wd, resume_step is not None),
        buckets=None if buckets is None else tuple(buckets),
        mesh_shape=tuple(int(x) for x in c.mesh.shape), rules=rules_from_config(c.mesh.rules),
        resume_note=resume_note, lock=dest.lock)
