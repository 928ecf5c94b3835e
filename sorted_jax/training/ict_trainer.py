"""Training SFT+ICT heads: Adam on one head per exit of a frozen SFT model (the heads, their
loss and their files are `sorted_jax.objective.heads`).

    heads, history = train_heads(params, config, dataset, exits, batch_size=32, lr=2e-5)

`IctTrainer` is the jitted step: the trunk's hidden states are computed without a gradient
and only the heads and their optimizer state are updated (and donated). `train_heads` is the
loop (cosine schedule, one epoch by default). `IctRecipe` and `train_ict_dir` are what
`python -m sorted_jax.ict` runs: an SFT model in, an ICT dir out, every setting the flag's
value, else what the SFT run recorded, else the default.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from sorted_jax.core.errors import IctError
from sorted_jax.data import DataIterator, Tokenizer, open_split_records, tokenize_records
from sorted_jax.io import destinations
from sorted_jax.io.artifacts import Artifact
from sorted_jax.io.ict_dir import save_ict_dir
from sorted_jax.io.run_settings import RunSettings
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.modeling import DTYPES, Llama, abstract_params, make_model
from sorted_jax.objective import soft
from sorted_jax.objective.heads import (
    IctHeads,
    frozen_hidden,
    heads_loss_sums,
    heads_shardings,
    init_heads,
)
from sorted_jax.parallel import sharding
from sorted_jax.training.run_data import data_stats, data_stats_line
from sorted_jax.training.train_step import make_optimizer, to_global_batch

__all__ = ["IctRecipe", "IctTrainer", "train_heads", "train_ict_dir"]


class IctTrainer:
    """Adam on the heads only; the trunk params are an input of the step, never an output."""

    def __init__(self, model: Llama, exits: Sequence[int], tx: optax.GradientTransformation,
                 mesh: Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES,
                 rows_per_chunk: int = 4096):
        self.model, self.exits, self.tx = model, tuple(exits), tx
        self.mesh, self.rules, self.rows_per_chunk = mesh, rules, rows_per_chunk
        self.batch_shardings = sharding.batch_sharding(mesh, rules)
        self.params_shardings = sharding.tree_shardings(abstract_params(model), mesh, rules)
        self._step = jax.jit(self._train_step, donate_argnums=(1, 2))
        self._init_opt = jax.jit(tx.init)
        self._eval_loss = jax.jit(
            lambda params, heads, batch: self._loss(heads, frozen_hidden(model, params, batch),
                                                    batch)[0])

    def place(self, params: Any, heads: IctHeads) -> tuple[Any, dict, Any]:
        """(params, heads tree, optimizer state) on the mesh."""
        params = jax.device_put(params, self.params_shardings)
        tree = jax.device_put({k: jnp.asarray(v, jnp.float32) for k, v in heads.tree().items()},
                              heads_shardings(self.mesh, self.rules, heads))
        return params, tree, self._init_opt(tree)

    def _loss(self, heads, hidden, batch):
        total, sums = heads_loss_sums(hidden, self.exits, heads, batch["targets"],
                                      batch["loss_mask"], eps=self.model.config.rms_norm_eps,
                                      rows_per_chunk=self.rows_per_chunk)
        return total / (jnp.maximum(sums.tokens, 1.0) * len(self.exits)), sums

    def _train_step(self, params, heads, opt_state, batch):
        hidden = frozen_hidden(self.model, params, batch)  # the frozen trunk: no gradient
        (loss, sums), grads = jax.value_and_grad(self._loss, has_aux=True)(heads, hidden, batch)
        updates, opt_state = self.tx.update(grads, opt_state, heads)
        heads = optax.apply_updates(heads, updates)
        return heads, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads),
                                  **soft.exit_metrics(sums, self.exits)}

    def train_step(self, params, heads, opt_state, batch):
        with sharding.activation_sharding(self.mesh, self.rules):
            return self._step(params, heads, opt_state, batch)

    def loss(self, params, heads, batch) -> float:
        """The heads' mean per-exit loss on one batch (no update)."""
        with sharding.activation_sharding(self.mesh, self.rules):
            return float(self._eval_loss(params, heads, batch))


def train_heads(params: Any, config: LlamaConfig, dataset: Any, exits: Sequence[int], *,
                batch_size: int = 32, epochs: float = 1.0, num_steps: int = 0,
                lr: float = 1e-3, warmup_steps: int = 0, seed: int = 0,
                buckets: Sequence[int] | None = None, dtype: Any = jnp.float32,
                mesh: Mesh | None = None, rules: sharding.Rules = sharding.DEFAULT_RULES,
                log_every: int = 10, log: Callable[[str], None] | None = None
                ) -> tuple[IctHeads, list[dict]]:
    """Train per-exit heads on `dataset` (a `TokenizedDataset`); returns (heads, history).

    history: one dict per logged step {"step", "loss", "loss/exit_n", "accuracy/exit_n"}
    (train-batch values, averaged over the logging window).
    """
    exits = soft.resolve_exits(list(exits), config.num_hidden_layers)
    mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
    sharding.check_batch_size(batch_size, mesh, rules)
    it = DataIterator(dataset, batch_size, seed=seed, shuffle=True, buckets=buckets)
    total = int(num_steps) if num_steps > 0 else max(1, math.ceil(epochs * it.steps_per_epoch))
    tx, _ = make_optimizer(lr=lr, total_steps=total, warmup_steps=warmup_steps,
                           schedule="cosine", end_lr_ratio=0.1, weight_decay=0.0)
    model = make_model(config, dtype=dtype, attention_impl="auto")
    trainer = IctTrainer(model, exits, tx, mesh, rules)
    params_dev, heads, opt_state = trainer.place(params, init_heads(params, config, exits))
    history: list[dict] = []
    window: list[dict] = []
    t0 = time.time()
    for step in range(1, total + 1):
        batch = to_global_batch(next(it), trainer.batch_shardings)
        heads, opt_state, metrics = trainer.train_step(params_dev, heads, opt_state, batch)
        window.append(metrics)
        if step % log_every == 0 or step == total or step == 1:
            host = [jax.device_get(m) for m in window]
            mean = {k: float(np.mean([h[k] for h in host])) for k in host[0] if k != "tokens"}
            history.append({"step": step, **mean})
            window = []
            if log is not None:
                log(f"ict step {step}/{total}: loss {mean['loss']:.4f} | "
                    + " ".join(f"e{e} {mean[f'loss/exit_{e}']:.3f}" for e in exits)
                    + f" ({time.time() - t0:.0f}s)")
    host = jax.device_get(heads)
    return IctHeads(exits, np.asarray(host["norm_scale"]),
                    np.asarray(host["lm_head_kernel"])), history


# ---------------------------------------------------------------------------------------------
# an SFT model in, an ICT dir out


def print_now(text: str) -> None:
    """A progress line on stdout, flushed (the command's output is often piped to a log)."""
    print(text, flush=True)


@dataclasses.dataclass(frozen=True)
class IctRecipe:
    """What the heads train on and how (recorded in `ict.json`)."""

    data: str
    split: str = "train"
    holdout: int = 0  # records of a JSON file the SFT run held out: excluded here too
    data_seed: int = 0
    template: str = "alpaca"
    max_len: int = 512
    batch_size: int = 32
    lr: float = 2e-5
    dtype: str = "float32"  # of the frozen trunk's compute
    buckets: list[int] | None = None
    epochs: float = 1.0
    num_steps: int = 0  # > 0: exactly this many steps
    warmup_steps: int = 0
    seed: int = 0  # the data's shuffle order
    log_every: int = 10

    @classmethod
    def from_settings(cls, s: RunSettings, *, data: str | None = None,
                      template: str | None = None, max_len: int | None = None,
                      batch_size: int | None = None, lr: float | None = None,
                      dtype: str | None = None, holdout: int | None = None,
                      **fixed: Any) -> IctRecipe:
        """Each setting given here, else what the SFT run recorded (`s`), else the default;
        `fixed` are the fields the run records nothing for (split, epochs, seed, ...)."""
        data = data or s.data
        if not data:
            raise IctError("--data is required (the checkpoint has no train_config.json naming "
                           "its data)")
        return cls(
            data=data, holdout=holdout if holdout is not None else (
                s.eval_holdout if data == s.data else 0),
            data_seed=s.data_seed, template=template or s.template or cls.template,
            max_len=max_len or s.max_len or cls.max_len,
            batch_size=batch_size or s.batch_size or cls.batch_size, lr=lr or s.lr or cls.lr,
            dtype=dtype or s.dtype or cls.dtype, buckets=s.buckets, **fixed)


def train_ict_dir(dest: destinations.Destination, art: Artifact, recipe: IctRecipe,
                  exits: Sequence[int], tokenizer: Tokenizer, mesh: Mesh,
                  log: Callable[[str], None] = print_now) -> dict[str, Any]:
    """Train heads for `exits` on the SFT model `art` and write the ICT dir `dest` (checked
    before anything is read); returns what `ict.json` records besides the exits (its
    "history": the logged steps' train losses)."""
    r = recipe
    records = open_split_records(r.data, r.split, holdout=r.holdout, seed=r.data_seed)
    dataset = tokenize_records(records, tokenizer, r.max_len, r.template)
    if len(dataset) == 0:
        raise IctError(f"no record of {r.data!r} fits max_len={r.max_len}")
    stats = data_stats(dataset, len(records))
    line = data_stats_line(stats, f"max_len={r.max_len}")
    if line:
        log(f"ICT data: {line}")
    params = art.load_params()
    config = art.config
    length = f"{r.num_steps} steps" if r.num_steps else f"{r.epochs:g} epoch(s)"
    log(f"ICT: {art.path} ({config.num_hidden_layers} layers), exits {list(exits)}, "
        f"{len(dataset)} examples of {r.data!r}, batch {r.batch_size}, lr {r.lr}, {length}")
    t0 = time.time()
    ict_heads, history = train_heads(
        params, config, dataset, exits, batch_size=r.batch_size, epochs=r.epochs,
        num_steps=r.num_steps, lr=r.lr, warmup_steps=r.warmup_steps, seed=r.seed,
        buckets=r.buckets, dtype=DTYPES[r.dtype], mesh=mesh, log_every=r.log_every, log=log)
    meta = {
        "source": str(art.path.absolute()), "data": r.data, "split": r.split,
        "holdout": r.holdout, "data_seed": r.data_seed, "template": r.template,
        "max_len": r.max_len, "batch_size": r.batch_size, "lr": r.lr, "epochs": r.epochs,
        "num_steps": history[-1]["step"], "seed": r.seed, "dtype": r.dtype,
        "buckets": r.buckets, "wall_time_s": time.time() - t0, "data_stats": stats,
        "history": history,
    }
    save_ict_dir(dest, params, config, ict_heads, getattr(tokenizer, "spec", None), meta)
    return meta
