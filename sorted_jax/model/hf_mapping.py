"""Weight mapping between an HF `LlamaForCausalLM` state dict and our params tree.

Only transposes, reshapes and stacking: our layouts keep HF's rotate-half rotary order, so no
q/k permutation is needed and a roundtrip is bitwise. Works tensor by tensor (`hf_tensor_to_ours`,
`iter_hf_tensors`) so file conversion can stream without two copies of a model in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from sorted_jax.core.errors import MappingError
from sorted_jax.model.config import LlamaConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")

# HF sub-module name inside a layer -> our path inside the scanned `layers` subtree.
_LAYER_PATHS: dict[str, tuple[str, ...]] = {
    "self_attn.q_proj": ("self_attn", "q_proj", "kernel"),
    "self_attn.k_proj": ("self_attn", "k_proj", "kernel"),
    "self_attn.v_proj": ("self_attn", "v_proj", "kernel"),
    "self_attn.o_proj": ("self_attn", "o_proj", "kernel"),
    "mlp.gate_proj": ("mlp", "gate_proj", "kernel"),
    "mlp.up_proj": ("mlp", "up_proj", "kernel"),
    "mlp.down_proj": ("mlp", "down_proj", "kernel"),
    "input_layernorm": ("input_layernorm", "scale"),
    "post_attention_layernorm": ("post_attention_layernorm", "scale"),
}
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def hf_shape(module: str, config: LlamaConfig) -> tuple[int, ...]:
    """HF's shape of a layer tensor (`module` like "self_attn.q_proj") under `config`."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.dim_per_head, config.kv_heads * config.dim_per_head
    return {
        "self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
        "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
        "mlp.down_proj": (d, f), "input_layernorm": (d,), "post_attention_layernorm": (d,),
    }[module]


def _to_ours(module: str, w: np.ndarray, config: LlamaConfig) -> np.ndarray:
    d, dh = config.hidden_size, config.dim_per_head
    if module == "self_attn.q_proj":
        return w.T.reshape(d, config.num_attention_heads, dh)
    if module in ("self_attn.k_proj", "self_attn.v_proj"):
        return w.T.reshape(d, config.kv_heads, dh)
    if module == "self_attn.o_proj":
        return w.T.reshape(config.num_attention_heads, dh, d)
    if module.startswith("mlp."):
        return w.T
    return w


def _to_hf(module: str, w: np.ndarray) -> np.ndarray:
    if module.startswith("self_attn.") and module != "self_attn.o_proj":
        return w.reshape(w.shape[0], -1).T
    if module == "self_attn.o_proj":
        return w.reshape(-1, w.shape[-1]).T
    if module.startswith("mlp."):
        return w.T
    return w


def hf_tensor_to_ours(name: str, w: np.ndarray, config: LlamaConfig
                      ) -> tuple[tuple[str, ...], int | None, np.ndarray] | None:
    """Map one HF tensor: (our path, layer index or None, array in our layout).

    Returns None for tensors HF may store but we derive (rotary inv_freq, a tied lm_head).
    """
    if _IGNORED.search(name):
        return None
    m = _LAYER.match(name)
    if m:
        layer, module = int(m.group(1)), m.group(2)
        if module not in _LAYER_PATHS:
            raise MappingError(f"unexpected tensor {name!r}")
        if layer >= config.num_hidden_layers:
            raise MappingError(f"tensor {name!r} is for layer {layer}, but the config has "
                               f"num_hidden_layers={config.num_hidden_layers}")
        _check_shape(name, w, hf_shape(module, config))
        return ("layers", *_LAYER_PATHS[module]), layer, _to_ours(module, w, config)
    d, v = config.hidden_size, config.vocab_size
    if name == "model.embed_tokens.weight":
        _check_shape(name, w, (v, d))
        return ("embed_tokens", "embedding"), None, w
    if name == "model.norm.weight":
        _check_shape(name, w, (d,))
        return ("norm", "scale"), None, w
    if name == "lm_head.weight":
        _check_shape(name, w, (v, d))
        if config.tie_word_embeddings:
            return None
        return ("lm_head", "kernel"), None, w.T
    raise MappingError(f"unexpected tensor {name!r}")


def _check_shape(name: str, w: np.ndarray, expected: tuple[int, ...]) -> None:
    if tuple(w.shape) != expected:
        raise MappingError(f"tensor {name!r} has shape {tuple(w.shape)}, but the config "
                           f"implies {expected}")


def expected_hf_names(config: LlamaConfig) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.{m}.weight" for m in _LAYER_PATHS]
    names.append("model.norm.weight")
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def hf_to_params(state_dict: Mapping[str, Any], config: LlamaConfig) -> dict:
    """A full HF state dict (numpy or torch tensors) -> our params tree of numpy arrays."""
    missing = [n for n in expected_hf_names(config) if n not in state_dict]
    if missing:
        raise MappingError(f"{len(missing)} tensors missing from the state dict, e.g. "
                           f"{missing[:5]}")
    per_layer: dict[tuple[str, ...], list[np.ndarray | None]] = {}
    params: dict = {}
    for name, tensor in state_dict.items():
        mapped = hf_tensor_to_ours(name, as_numpy(tensor), config)
        if mapped is None:
            continue
        path, layer, w = mapped
        if layer is None:
            _set(params, path, w)
        else:
            per_layer.setdefault(path, [None] * config.num_hidden_layers)[layer] = w
    for path, ws in per_layer.items():
        _set(params, path, np.stack(ws))
    return params


def iter_hf_tensors(params: Mapping[str, Any], config: LlamaConfig,
                    include_tied_head: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Our params -> (HF name, array) one tensor at a time, in HF's order.

    Pulls one layer slice at a time from the stacked arrays, so exporting streams.
    """
    yield "model.embed_tokens.weight", as_numpy(params["embed_tokens"]["embedding"])
    layers = params["layers"]
    for i in range(config.num_hidden_layers):
        for module, path in _LAYER_PATHS.items():
            node = layers
            for key in path:
                node = node[key]
            yield f"model.layers.{i}.{module}.weight", _to_hf(module, as_numpy(node[i]))
    yield "model.norm.weight", as_numpy(params["norm"]["scale"])
    if not config.tie_word_embeddings:
        yield "lm_head.weight", as_numpy(params["lm_head"]["kernel"]).T
    elif include_tied_head:
        yield "lm_head.weight", as_numpy(params["embed_tokens"]["embedding"])


def params_to_hf(params: Mapping[str, Any], config: LlamaConfig,
                 include_tied_head: bool = False) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v)
            for k, v in iter_hf_tensors(params, config, include_tied_head)}


def as_numpy(x: Any) -> np.ndarray:
    """A numpy view of a numpy/jax array or torch tensor (torch bf16 kept as ml_dtypes bf16)."""
    if hasattr(x, "detach"):  # a torch tensor; torch cannot .numpy() bf16, so reinterpret its bits
        import torch  # heavy optional package: only when handed a torch tensor

        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(x)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
