"""The logits of any exit, in one call: what a notebook or a custom eval loop needs.

Exit k is the trunk's state after layer k, through exit k's adapter where it has one
(`exit_adapters`), then the model's own final norm and shared head. Only layers [0, k) run.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.exit_adapters import apply_adapters
from sorted_jax.model.modeling import Llama, make_model

Array = jax.Array


def exit_logits(params: dict, config: LlamaConfig, input_ids: Array, exit_layer: int | None = None,
                *, attention_mask: Array | None = None, dtype: Any = None,
                model: Llama | None = None) -> Array:
    """fp32 logits `[B, T, V]` of exit `exit_layer` (default: the full model, L).

    Runs the first k layers of the stacked params (a sub-model costs k layers, not L).
    """
    big_l = config.num_hidden_layers
    k = big_l if exit_layer is None else int(exit_layer)
    if not 1 <= k <= big_l:
        raise ValueError(f"exit_layer must be in 1..{big_l}, got {exit_layer}")
    if model is None:
        model = make_model(config) if dtype is None else make_model(config, dtype=dtype)
    # a model of k layers over the first k rows of the stack (the trunk's; no adapters)
    shallow = make_model(config.layers_config(k), dtype=model.dtype,
                         attention_impl=model.attention_impl)
    trunk = {n: v for n, v in params.items() if n != "exit_adapters"}
    trunk["layers"] = jax.tree.map(lambda w: w[:k], params["layers"])
    ids = jnp.asarray(input_ids, jnp.int32)
    hidden = shallow.apply({"params": trunk}, ids, attention_mask=attention_mask,
                           exits=(k,)).hidden
    hidden = apply_adapters(model, params, hidden, (k,), attention_mask=attention_mask)
    return shallow.apply({"params": trunk}, hidden[0], method="head")
