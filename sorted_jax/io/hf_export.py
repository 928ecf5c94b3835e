"""Our params as a plain HF `LlamaForCausalLM` dir, whole or as the depth-k sub-model.

The dir holds `config.json`, `generation_config.json`, the weights in HF's (sharded)
safetensors layout (`safetensors_shards`) and, when given, the tokenizer files. The sub-model
of depth k is the first k layers with the shared final norm and head (and, where exit k has
an exit adapter, that adapter as layer k + 1): any HF-compatible server runs it as is.

Memory: HF's tensors are transposes of our stacked arrays, and the safetensors library writes
a shard from buffers that all exist at once, so copies are needed. Made in file order, they
would hold a whole shard of copies beside the model; `in_hf_layout` makes them one stored
array at a time instead, dropping its views as it goes, so each stored array is freed once its
last copy exists (when nothing else holds it): the peak is one model plus one stored array.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sorted_jax.core.errors import ConversionError
from sorted_jax.io import safetensors_shards
from sorted_jax.io.destinations import Destination, atomic_dir
from sorted_jax.io.hf_checkpoint import GENERATION_CONFIG_FILE
from sorted_jax.io.hf_weights import progress_bar
from sorted_jax.io.model_io import (
    CONFIG_FILE,
    check_params,
    copy_tokenizer_files,
    dtype_name,
    resolve_dtype,
)
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.exit_adapters import submodel_params
from sorted_jax.model.hf_mapping import iter_hf_tensors
from sorted_jax.model.modeling import slice_layers

_LAYER_PREFIX = re.compile(r"^model\.layers\.\d+\.")


def hf_config_dict(config: LlamaConfig, dtype: np.dtype) -> dict:
    d = config.to_hf_dict()
    d["dtype"] = d["torch_dtype"] = dtype_name(dtype)
    return d


def generation_config_dict(config: LlamaConfig) -> dict:
    """The special ids HF `generate` reads (an EOS list stays a list)."""
    return {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if getattr(config, k) is not None}


def check_exit_layer(k: int, config: LlamaConfig) -> None:
    L = config.num_hidden_layers
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= L:
        raise ConversionError(f"--exit-layer must be in 1..{L} (the model has {L} layers), "
                              f"got {k}")


def _numpy_tree(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _numpy_tree(v) for k, v in tree.items()}
    return tree if isinstance(tree, np.ndarray) else np.asarray(tree)


def submodel_tensors(params: Mapping[str, Any], config: LlamaConfig,
                     exit_layer: int | None = None) -> tuple[dict[str, np.ndarray], LlamaConfig]:
    """(HF name -> view into `params`, in HF's order; the sub-model's config) for the first
    `exit_layer` layers (default all). The views are then the only holders of the arrays that
    the caller lets go of."""
    k = config.num_hidden_layers if exit_layer is None else exit_layer
    check_exit_layer(k, config)
    params = _numpy_tree(params)
    check_params(params, config)
    if config.exit_adapters:
        params, sub_config = submodel_params(params, config, k)
        return dict(iter_hf_tensors(params, sub_config)), sub_config
    if k < config.num_hidden_layers:
        params = slice_layers(params, 0, k)
    sub_config = config.submodel(k)
    return dict(iter_hf_tensors(params, sub_config)), sub_config


def _stored_array(name: str) -> str:
    """Which stacked array an HF tensor comes from: its name with the layer number dropped."""
    return _LAYER_PREFIX.sub("model.layers.*.", name)


def in_hf_layout(views: dict[str, np.ndarray], dtype: np.dtype | None = None
                 ) -> dict[str, np.ndarray]:
    """Every tensor C-contiguous (cast to `dtype` if given), in the order of `views`, which is
    emptied: copies are made grouped by the stacked array they come from (module docstring)."""
    order = list(views)
    out: dict[str, np.ndarray] = {}
    for name in sorted(order, key=_stored_array):
        out[name] = np.ascontiguousarray(views.pop(name), dtype=dtype)
    return {name: out.pop(name) for name in order}


def write_hf_dir(tmp: Path, tensors: dict[str, np.ndarray], config: LlamaConfig,
                 max_shard_bytes: int, progress: bool = True) -> None:
    """Safetensors shards (+ index), config.json and generation_config.json into `tmp`;
    `tensors` (C-contiguous, as written) is consumed shard by shard."""
    out_dtype = np.result_type(*[w.dtype for w in tensors.values()])
    total = sum(w.nbytes for w in tensors.values())
    with progress_bar(total, "writing safetensors", progress) as bar:
        safetensors_shards.write_shards(tmp, tensors, max_shard_bytes, bar)
    (tmp / CONFIG_FILE).write_text(
        json.dumps(hf_config_dict(config, out_dtype), indent=2, sort_keys=True) + "\n")
    (tmp / GENERATION_CONFIG_FILE).write_text(
        json.dumps(generation_config_dict(config), indent=2) + "\n")


def write_export(out_dir: str | Path | Destination, views: dict[str, np.ndarray],
                 config: LlamaConfig, dtype: Any = None, shard_size: str | int = "2GB",
                 tokenizer: str | Path | Iterable[str | Path] | None = None,
                 overwrite: bool = False, progress: bool = True) -> Path:
    """Write the HF tensors `views` (from `submodel_tensors`, consumed) of a model with
    `config` as an HF dir, atomically (`out_dir` a path, or a checked `Destination`)."""
    max_bytes = safetensors_shards.parse_size(shard_size)
    tensors = in_hf_layout(views, resolve_dtype(dtype))
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_hf_dir(tmp, tensors, config, max_bytes, progress)
        if tokenizer is not None:
            copy_tokenizer_files(tokenizer, tmp)
    return out_dir.path if isinstance(out_dir, Destination) else Path(out_dir)


def export_hf(params: Mapping[str, Any], config: LlamaConfig, out_dir: str | Path | Destination,
              exit_layer: int | None = None, dtype: Any = None, shard_size: str | int = "2GB",
              tokenizer: str | Path | Iterable[str | Path] | None = None,
              overwrite: bool = False, progress: bool = True) -> Path:
    """Write params (or the sub-model of depth `exit_layer`) as an HF LlamaForCausalLM dir.

    The caller keeps `params`, so this holds the model twice at most; `conversion.orbax_to_hf`
    hands its params over and holds it once."""
    safetensors_shards.parse_size(shard_size)
    resolve_dtype(dtype)
    views, sub_config = submodel_tensors(params, config, exit_layer)
    return write_export(out_dir, views, sub_config, dtype, shard_size, tokenizer, overwrite,
                        progress)
