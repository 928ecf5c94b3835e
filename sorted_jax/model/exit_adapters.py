"""Exit adapters: one extra decoder layer per exit, on a frozen trunk.

SoFT trains the trunk itself, so the full model pays for its sub-models. An exit adapter keeps
the trunk as it is (a base or an SFT model, frozen) and gives each exit k < L its own decoder
layer between layer k and the shared final norm + head (the direction of Sorted LLaMA's
successors: EE-Tuning freezes the backbone, Balcony adds one layer per exit). The full model's
output is then the trunk's own, bit for bit, and the depth-k sub-model with its adapter is a
plain LLaMA of k + 1 layers (`submodel_params`).

An adapter is a `DecoderLayer` with the trunk's shapes: `params["exit_adapters"]` is a stack
`[A, ...]` laid out exactly like `params["layers"]`, so everything that runs a stacked layer
(`modeling.run_layer_range`, sharding rules, the HF name mapping) runs an adapter too.
Adapters start as copies of a trunk layer (`init`: layer k + 1, the one the exit skips next, or
the last layer), so at step 0 an adapted exit is already "one more layer" of the trunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax.model.config import ConfigError, LlamaConfig
from sorted_jax.model.modeling import (
    EXIT_ADAPTERS,
    DecoderLayer,
    LayerInputs,
    Llama,
    resolve_attention_impl,
)

Array = jax.Array

KEY = EXIT_ADAPTERS
INITS = ("next", "last")


def adapter_index(config: LlamaConfig, exit_layer: int) -> int | None:
    """Row of exit `exit_layer`'s adapter in the stack; None when that exit has none."""
    try:
        return config.exit_adapters.index(exit_layer)
    except ValueError:
        return None


def check_adapter_exits(exits: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Adapter exits: increasing layer numbers in 1..L-1 (the last exit is the trunk's own)."""
    out = tuple(int(e) for e in exits)
    if any(not 1 <= e < num_layers for e in out) or any(
            a >= b for a, b in zip(out, out[1:], strict=False)):
        raise ConfigError(f"exit adapters go on increasing exits in 1..{num_layers - 1} (the "
                          f"last exit, {num_layers}, is the frozen trunk's own), got {out}")
    return out


def init_adapters(params: dict, config: LlamaConfig, init: str = "next") -> dict:
    """`params` with a fresh adapter stack: adapter k copies trunk layer k + 1 (`next`, 1-based:
    the layer right after the exit) or the last layer (`last`)."""
    if init not in INITS:
        raise ConfigError(f"exit adapter init must be one of {', '.join(INITS)}, got {init!r}")
    exits = check_adapter_exits(config.exit_adapters, config.num_hidden_layers)
    rows = jnp.asarray([e if init == "next" else config.num_hidden_layers - 1 for e in exits])
    out = dict(params)
    out[KEY] = jax.tree.map(lambda w: jnp.take(w, rows, axis=0), params["layers"])
    return out


def apply_adapters(model: Llama, params: dict, hidden: Array, exits: Sequence[int], *,
                   positions: Array | None = None, attention_mask: Array | None = None,
                   segment_ids: Array | None = None) -> Array:
    """The exits' states `[K, B, T, D]` with each adapted exit passed through its adapter.

    Exits without an adapter (the last, or any exit trained without one) are returned as they
    are. The adapters see the same attention mask, positions and segments as the trunk.
    """
    config = model.config
    rows = [(j, adapter_index(config, e)) for j, e in enumerate(exits)]
    rows = [(j, a) for j, a in rows if a is not None]
    if not rows:
        return hidden
    attention = model.apply({"params": params}, hidden[0], positions, attention_mask,
                            segment_ids, None, method=Llama._attention_inputs)
    layer = DecoderLayer(config, dtype=model.dtype, param_dtype=model.param_dtype,
                         attention_impl=resolve_attention_impl(model.attention_impl, model.dtype))
    inputs = LayerInputs(attention, None)
    slots = jnp.asarray([j for j, _ in rows])
    which = jnp.asarray([a for _, a in rows])

    def one(args):
        h, weights = args
        (out, _, _, _), _ = layer.apply({"params": weights},
                                        (h, None, jnp.zeros((), jnp.int32), None), inputs)
        return out

    weights = jax.tree.map(lambda w: jnp.take(w, which, axis=0), params[KEY])
    adapted = jax.lax.map(one, (hidden[slots], weights))
    return hidden.at[slots].set(adapted.astype(hidden.dtype))


def submodel_params(params: dict, config: LlamaConfig, depth: int) -> tuple[dict, LlamaConfig]:
    """The depth-k sub-model as a plain LLaMA: layers [0, k) then exit k's adapter (k + 1
    layers), or the first k layers where exit k has none; no adapter stack left."""
    out = {k: v for k, v in params.items() if k != KEY}
    a = adapter_index(config, depth)
    layers = jax.tree.map(lambda w: w[:depth], params["layers"])
    if a is not None:  # numpy stays numpy (conversion holds host arrays, not device ones)
        def join(w, x):
            xp = np if isinstance(w, np.ndarray) else jnp
            return xp.concatenate([w, x[a:a + 1]], axis=0)

        layers = jax.tree.map(join, layers, params[KEY])
    out["layers"] = layers
    n = depth + (a is not None)
    return out, config.replace(num_hidden_layers=n, exit_adapters=())


def trunk_params(params: dict) -> dict:
    """Everything but the adapters (what must stay bit-identical while adapters train)."""
    return {k: v for k, v in params.items() if k != KEY}
