"""sorted_jax: Sorted Fine-Tuning (SoFT) of LLaMA models in JAX/Flax.

The commands (`python -m sorted_jax.train | convert | generate | evaluate | ict | serve |
sweep`) are the main way in; for notebooks, a small API (imported lazily, so `import
sorted_jax` stays light):

    import sorted_jax as sj
    m = sj.load_model("runs/soft")                       # model dir or training workdir
    ids = m.tokenizer.encode("Name three colours.")
    logits = sj.exit_logits(m.params, m.config, [ids], exit_layer=4)   # [1, T, V] fp32
    dec = sj.Decoder(m.params, m.config)
    out = dec.generate([ids], mode="speculative", draft_layer=2, max_new_tokens=32)
    total, sums = sj.soft_loss(hidden_exits, norm_scale, head_kernel, targets, mask, weights,
                               eps=m.config.rms_norm_eps)    # the chunked multi-exit loss

`sj.Trainer(sj.default_config(), workdir).train()` is `python -m sorted_jax.train` in-process.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "LlamaConfig": ("sorted_jax.model.config", "LlamaConfig"),
    "make_model": ("sorted_jax.model.modeling", "make_model"),
    "init_params": ("sorted_jax.model.modeling", "init_params"),
    "exit_logits": ("sorted_jax.model.exits", "exit_logits"),
    "load_model": ("sorted_jax.io.artifacts", "load_model"),
    "inspect": ("sorted_jax.io.artifacts", "inspect"),
    "Decoder": ("sorted_jax.decoding.engine", "Decoder"),
    "DecodeOptions": ("sorted_jax.decoding.options", "DecodeOptions"),
    "soft_loss": ("sorted_jax.objective.soft", "multi_exit_losses"),
    "resolve_exits": ("sorted_jax.objective.soft", "resolve_exits"),
    "Trainer": ("sorted_jax.training.trainer", "Trainer"),
    "default_config": ("sorted_jax.training.train_config", "default_config"),
    "UserError": ("sorted_jax.core.errors", "UserError"),
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'sorted_jax' has no attribute {name!r}")
    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
