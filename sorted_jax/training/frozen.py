"""What a run keeps frozen: the anchored run's teacher, and the trunk under exit adapters.

Both keep the full model where SFT would take it, with the same step (`train_step.SoftSteps`):
- anchored SoFT (`anchor_weight > 0`): a frozen teacher's distribution on the same tokens
  anchors the last exit (KL); its weights are loaded here, beside the model, never trained
  and never checkpointed (a resumed run loads them again from the same source);
- exit adapters (`exit_adapters='layer'`): the trunk is init_from's weights, frozen; only the
  adapter layers train (`SoftSteps.trainable_keys`).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from sorted_jax.core.errors import TrainConfigError
from sorted_jax.io import model_io
from sorted_jax.model import modeling
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.exit_adapters import KEY as ADAPTERS
from sorted_jax.model.exit_adapters import init_adapters
from sorted_jax.model.modeling import DTYPES, Llama


def teacher_source(c: ml_collections.ConfigDict) -> str:
    """The teacher's weights: init_from for 'base', else the path given."""
    teacher = str(c.anchor_teacher).strip()
    return str(c.init_from) if teacher == "base" else teacher


def teacher_model(c: ml_collections.ConfigDict, model_config: LlamaConfig) -> Llama | None:
    """The frozen teacher of an anchored run (None otherwise). It may have another depth or
    width than the model, not another vocab."""
    if not c.anchor_weight > 0:
        return None
    source = teacher_source(c)
    config = model_io.load_config(source).replace(exit_adapters=())
    if config.vocab_size != model_config.vocab_size:
        raise TrainConfigError(f"anchor_teacher {source}: its vocab_size {config.vocab_size} is "
                               f"not the model's {model_config.vocab_size}; the KL compares "
                               "distributions over the same tokens")
    model = modeling.make_model(config, dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype],
                                attention_impl=c.attention_impl, remat_policy=c.remat_policy)
    return model


def anchor_weights(c: ml_collections.ConfigDict, exits: tuple[int, ...]) -> np.ndarray | None:
    """a_k per exit: `anchor_weight` on the last exit, 0 elsewhere (None when not anchored)."""
    if not c.anchor_weight > 0:
        return None
    out = np.zeros(len(exits), np.float32)
    out[-1] = float(c.anchor_weight)
    return out


def load_teacher(c: ml_collections.ConfigDict, shardings: Any) -> dict:
    """The teacher's weights, straight into their shardings (each process reads its own)."""
    params, _, _ = model_io.load_params(teacher_source(c), dtype=c.param_dtype,
                                        shardings=shardings)
    return {k: v for k, v in params.items() if k != ADAPTERS}


def load_trunk_with_adapters(c: ml_collections.ConfigDict, model_config: LlamaConfig,
                             params_shardings: Any) -> dict:
    """init_from's weights as the frozen trunk, plus fresh adapters (copies of trunk layers,
    `exit_adapter_init`) placed in the state's shardings."""
    trunk_shardings = {k: v for k, v in params_shardings.items() if k != ADAPTERS}
    params, _, _ = model_io.load_params(c.init_from, dtype=c.param_dtype,
                                        shardings=trunk_shardings)
    params = {k: v for k, v in params.items() if k != ADAPTERS}
    add = jax.jit(lambda p: init_adapters(p, model_config, c.exit_adapter_init),
                  out_shardings=params_shardings)
    return add(params)
