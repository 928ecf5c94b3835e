"""A LoRA run's side of training: its spec from the config, its frozen base and that base's
record in every checkpoint (`io.lora_merge.BaseRecord`).

    spec = lora_spec(config)                    # None for full fine-tuning (lora.rank = 0)
    base, record = load_base(config, spec, steps)   # init_from's weights + their fingerprint
    check_resume(record, workdir, step)         # a resumed run must use the same base

The base is loaded as the step holds it: straight into its shardings in its dtype, or, for a
quantised base, to the host in bfloat16 so that `SoftSteps.set_frozen` quantises it one layer at
a time (the device never holds the unquantised stack).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sorted_jax.core.errors import TrainConfigError
from sorted_jax.io import model_io
from sorted_jax.io.lora_merge import BaseRecord
from sorted_jax.model import lora
from sorted_jax.model.config import ConfigError, LlamaConfig
from sorted_jax.model.lora import LoraSpec, parse_targets
from sorted_jax.model.modeling import DTYPES, EXIT_ADAPTERS


def lora_spec(c: ml_collections.ConfigDict) -> LoraSpec | None:
    """The run's LoRA spec (`lora.*`), checked; None for full fine-tuning (lora.rank = 0)."""
    r = c.lora.rank
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise TrainConfigError(f"lora.rank must be an integer >= 0 (0 = full fine-tuning, else "
                               f"the adapters' rank, e.g. 16), got {r!r}")
    if r == 0:
        return None
    try:
        return LoraSpec(rank=r, alpha=float(c.lora.alpha), dropout=float(c.lora.dropout),
                        targets=parse_targets(c.lora.targets), base_dtype=str(c.lora.base_dtype),
                        train_norms=bool(c.lora.train_norms),
                        adapter_dtype=jnp.dtype(DTYPES[c.param_dtype]).name)
    except ConfigError as e:
        raise TrainConfigError(str(e)) from None


def check_model(spec: LoraSpec | None, config: LlamaConfig) -> None:
    """What the base's shapes must allow (before anything is loaded or compiled)."""
    if spec is None:
        return
    if config.exit_adapters:
        raise TrainConfigError(f"lora.rank={spec.rank}: init_from has exit adapters; LoRA needs "
                               "a plain LLaMA base (export one with convert orbax-to-hf)")
    try:
        lora.check_model(spec, config.hidden_size)
    except ConfigError as e:
        raise TrainConfigError(str(e)) from None


def base_param_dtype(c: ml_collections.ConfigDict, spec: LoraSpec | None) -> Any:
    """The model's param dtype: the base's for a LoRA run (adapters: `spec.adapter_dtype`)."""
    return DTYPES[c.param_dtype] if spec is None else spec.float_dtype


def load_base(c: ml_collections.ConfigDict, spec: LoraSpec, steps: Any
              ) -> tuple[dict, BaseRecord]:
    """init_from's weights as the frozen base (with the base's norms when they train), and the
    record every checkpoint of the run keeps of them."""
    dtype = jnp.dtype(spec.float_dtype).name
    if spec.quantised:
        params, _, _ = model_io.load_params(c.init_from, dtype=dtype)
    else:
        shardings = lora.merge_trees(
            steps.frozen_shardings, lora.split_tree(steps.params_shardings, lora.is_adapter)[1])
        params, _, _ = model_io.load_params(c.init_from, dtype=dtype, shardings=shardings)
    params = {k: v for k, v in params.items() if k != EXIT_ADAPTERS}
    record = BaseRecord(str(Path(c.init_from).absolute()), lora.fingerprint(params), spec)
    return params, record


def check_resume(record: BaseRecord, workdir: Path, step: int) -> None:
    """A resumed LoRA run continues on the base its adapters were trained on; a full run's
    checkpoints are not resumed as a LoRA run's, nor the other way round."""
    where = f"step {step} of {workdir}"
    saved = BaseRecord.from_meta(model_io.read_workdir_meta(workdir, step), where)
    if saved is None:
        raise TrainConfigError(f"{where} was written by a full fine-tuning run (lora.rank=0); "
                               "it cannot resume as a LoRA run: start a new workdir (init_from "
                               "this one to train adapters on it)")
    if saved.fingerprint != record.fingerprint:
        raise TrainConfigError(
            f"{where} holds LoRA adapters trained on the base {saved.init_from} (fingerprint "
            f"{saved.fingerprint}), but init_from={record.init_from} is another model "
            f"(fingerprint {record.fingerprint}): set init_from back to that base, or start a "
            "new workdir")


def check_full_resume(workdir: Path, step: int) -> None:
    """A full fine-tuning run does not resume a LoRA run's checkpoints."""
    where = f"step {step} of {workdir}"
    if BaseRecord.from_meta(model_io.read_workdir_meta(workdir, step), where) is not None:
        raise TrainConfigError(f"{where} holds LoRA adapters: resume it with the run's lora.* "
                               "settings (lora.rank > 0), or start a new workdir with init_from "
                               "this one for full fine-tuning on the merged model")


def setup_base(c: ml_collections.ConfigDict, steps: Any, eval_steps: Any, workdir: Path,
               resume_step: int | None) -> tuple[dict | None, BaseRecord | None]:
    """A LoRA run's frozen base placed in `steps` and `eval_steps` (quantised there if asked),
    and its record; a resumed run's checkpoints must fit it (and a full run's must not be a LoRA
    run's). Returns the part of the base that trains (norms with `train_norms`) and the record;
    (None, None) for a full run."""
    if steps.lora is None:
        if resume_step is not None:
            check_full_resume(workdir, resume_step)
        return None, None
    base, record = load_base(c, steps.lora, steps)
    if resume_step is not None:
        check_resume(record, workdir, resume_step)
    trained, frozen = steps.split(base)
    del base
    steps.set_frozen(frozen)
    eval_steps.frozen_params = steps.frozen_params  # the same model: the same arrays
    return trained, record


def fresh_state(steps: Any, trained_base: dict, c: ml_collections.ConfigDict
                ) -> tuple[Any, str]:
    """Step 0 of a LoRA run: fresh adapters (B = 0: the base's outputs) beside the base's
    trained part, and the line the log says about it."""
    spec = steps.lora
    adapters = steps.fresh_adapters(jax.random.PRNGKey(c.seed))
    state = steps.state_from_params(lora.merge_trees(trained_base, adapters))
    n = sum(int(x.size) for x in jax.tree.leaves(state.params))
    return state, (f"LoRA rank {spec.rank} (alpha {spec.alpha}) on {','.join(spec.targets)} over "
                   f"the frozen base {c.init_from} ({spec.base_dtype}): {n / 1e6:.2f}M trained "
                   "params")
