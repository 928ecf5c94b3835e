"""SFT+ICT heads, the paper's baseline as a library: one extra head per exit of a frozen model.

Each exit n gets its own head: a final RMSNorm scale and an lm_head kernel, both initialised
from the model's shared ones. The trunk (embeddings and decoder layers) is frozen: its hidden
states are computed under `jax.lax.stop_gradient` and only the heads are handed to the
optimizer. Loss = mean over exits of each exit's token-mean cross-entropy, computed with the
same chunked code as SoFT (`soft.exit_losses`, one exit per head).

On disk (`save_ict_dir`), an ICT dir is a model dir that every tool reads as the (unchanged)
SFT model, plus the heads beside it:

    DIR/config.json, DIR/params/, tokenizer files   the frozen SFT model (`model_io` model dir)
    DIR/ict_heads/    Orbax pytree {"norm_scale": [K, D], "lm_head_kernel": [K, D, V]}
    DIR/ict.json      {"exits": [...], "source", "template", "max_len", "data", losses, ...}

`exit_model` gives (params, config) of the sub-model "first n layers + head n" for decoding;
`HeadsEval` scores them. Training them is `sorted_jax.training.ict_trainer` (the command:
`python -m sorted_jax.ict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from sorted_jax.core.errors import IctError
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.modeling import Llama, head_weights
from sorted_jax.objective import soft
from sorted_jax.parallel import sharding

__all__ = ["HeadsEval", "IctError", "IctHeads", "check_heads", "exit_model", "frozen_hidden",
           "heads_loss_sums", "heads_shardings", "init_heads"]

Array = jax.Array


@dataclasses.dataclass
class IctHeads:
    """One head per exit: `norm_scale [K, D]`, `lm_head_kernel [K, D, V]`, for `exits`."""

    exits: tuple[int, ...]
    norm_scale: Any
    lm_head_kernel: Any

    def tree(self) -> dict[str, Any]:
        return {"norm_scale": self.norm_scale, "lm_head_kernel": self.lm_head_kernel}

    def index(self, exit_layer: int) -> int:
        if exit_layer not in self.exits:
            raise IctError(f"no ICT head for exit {exit_layer}: the heads were trained for exits "
                           f"{list(self.exits)}")
        return self.exits.index(exit_layer)

    def select(self, exits: Sequence[int]) -> IctHeads:
        idx = [self.index(e) for e in exits]
        return IctHeads(tuple(exits), self.norm_scale[np.asarray(idx)],
                        self.lm_head_kernel[np.asarray(idx)])


def init_heads(params: Mapping[str, Any], config: LlamaConfig,
               exits: Sequence[int]) -> IctHeads:
    """K copies of the model's shared final norm and lm_head (float32)."""
    exits = soft.resolve_exits(list(exits), config.num_hidden_layers)
    scale, kernel = head_weights(dict(params), config)
    scale = np.asarray(scale, np.float32)
    kernel = np.asarray(kernel, np.float32)
    k = len(exits)
    return IctHeads(exits, np.broadcast_to(scale, (k, *scale.shape)).copy(),
                    np.broadcast_to(kernel, (k, *kernel.shape)).copy())


def check_heads(heads: IctHeads, config: LlamaConfig, where: str = "ICT heads") -> None:
    d, v, k = config.hidden_size, config.vocab_size, len(heads.exits)
    want = {"norm_scale": (k, d), "lm_head_kernel": (k, d, v)}
    for name, shape in want.items():
        got = tuple(np.shape(getattr(heads, name)))
        if got != shape:
            raise IctError(f"{where}: {name} has shape {got}, the model (hidden {d}, vocab {v}) "
                           f"with {k} exits {list(heads.exits)} needs {shape}")
    try:
        soft.resolve_exits(list(heads.exits), config.num_hidden_layers)
    except soft.ExitError as e:
        raise IctError(f"{where}: {e}") from None


def exit_model(params: Mapping[str, Any], config: LlamaConfig, heads: IctHeads | None,
               exit_layer: int) -> tuple[dict, LlamaConfig]:
    """(params, config) whose shared norm/lm_head are exit `exit_layer`'s ICT head.

    Run the result's first `exit_layer` layers (e.g. `Decoder(...).generate(mode="fixed",
    exit_layer=exit_layer)`) for "layers 1..n + head n". Without heads: unchanged.
    """
    if heads is None:
        return dict(params), config
    k = heads.index(exit_layer)
    out = dict(params)
    out["norm"] = {"scale": heads.norm_scale[k]}
    out["lm_head"] = {"kernel": heads.lm_head_kernel[k]}
    if config.tie_word_embeddings:  # the head is its own matrix now
        config = config.replace(tie_word_embeddings=False)
    return out, config


# ---------------------------------------------------------------------------------------------
# the per-exit-head loss (training and evaluation share it) and evaluation


def heads_loss_sums(hidden: Array, exits: Sequence[int], heads: Mapping[str, Array],
                    targets: Array, loss_mask: Array, *, eps: float,
                    rows_per_chunk: int = 4096) -> tuple[Array, soft.ExitSums]:
    """(sum over exits of each exit's CE sum, per-exit sums), exit k through head k.

    `hidden` is the model's `[L, B, T, D]` stack; each exit's CE is `soft.exit_losses` on its
    own row with its own (norm scale, kernel): the code SoFT trains and evaluates with.
    """
    total = jnp.zeros((), jnp.float32)
    losses, correct = [], []
    sums = None
    for k, e in enumerate(exits):
        t, sums = soft.exit_losses(hidden[e - 1][None], (1,), heads["norm_scale"][k],
                                   heads["lm_head_kernel"][k], targets, loss_mask,
                                   jnp.ones((1,), jnp.float32), eps=eps,
                                   rows_per_chunk=rows_per_chunk)
        total = total + t
        losses.append(sums.loss)
        correct.append(sums.correct)
    assert sums is not None, "no exits"
    return total, soft.ExitSums(loss=jnp.concatenate(losses), correct=jnp.concatenate(correct),
                                tokens=sums.tokens)


def frozen_hidden(model: Llama, params: Any, batch: Mapping[str, Array]) -> Array:
    """The `[L, B, T, D]` hidden states of every layer, with no gradient into the trunk."""
    out = model.apply({"params": params}, batch["input_ids"],
                      attention_mask=batch.get("attention_mask"),
                      segment_ids=batch.get("segment_ids"),
                      positions=batch.get("positions") if "segment_ids" in batch else None)
    return jax.lax.stop_gradient(out.hidden)


def heads_shardings(mesh: Mesh, rules: sharding.Rules, heads: IctHeads) -> dict:
    names = {"norm_scale": (None, "embed"), "lm_head_kernel": (None, "embed", "vocab")}
    return {k: NamedSharding(mesh, sharding.spec_for(names[k], np.shape(v), mesh, rules))
            for k, v in heads.tree().items()}


class HeadsEval:
    """Jitted per-exit sums with per-exit heads: `eval_step(params, heads_tree, batch)`."""

    def __init__(self, model: Llama, exits: Sequence[int], mesh: Mesh,
                 rules: sharding.Rules = sharding.DEFAULT_RULES, rows_per_chunk: int = 4096):
        self.model, self.exits = model, tuple(exits)
        self.mesh, self.rules, self.rows_per_chunk = mesh, rules, rows_per_chunk
        self._eval = jax.jit(self._eval_step)

    def _eval_step(self, params, heads, batch):
        hidden = frozen_hidden(self.model, params, batch)
        return heads_loss_sums(hidden, self.exits, heads, batch["targets"], batch["loss_mask"],
                               eps=self.model.config.rms_norm_eps,
                               rows_per_chunk=self.rows_per_chunk)[1]

    def eval_step(self, params: Any, heads: Mapping[str, Array], batch: Mapping[str, Array]
                  ) -> soft.ExitSums:
        with sharding.activation_sharding(self.mesh, self.rules):
            return self._eval(params, heads, batch)
