"""Our params tree as every reader and writer of weights sees it: its leaves' paths and shapes
for a config, flat <-> nested, dtype names, and placing a host tree into its shardings.

The lowest module of `sorted_jax.io` that knows the model: `model_io` (our dirs), `hf_weights`
(HF tensors) and `gguf` (GGUF tensors) all build on it, so `model_io` can read the other two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from sorted_jax.core.errors import ModelIOError
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.modeling import DTYPES, abstract_params, make_model

Path_ = tuple[str, ...]


def resolve_dtype(dtype: Any) -> np.dtype | None:
    """`None`, a name of `modeling.DTYPES` ("float32", "bf16", ...) or a numpy/jax dtype ->
    numpy dtype or None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ModelIOError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
        dtype = DTYPES[dtype.lower()]
    return np.dtype(dtype)


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name  # "float32", "bfloat16", "float16"


def expected_param_shapes(config: LlamaConfig) -> dict[Path_, tuple[int, ...]]:
    """Path -> shape of every leaf of our params tree for `config`: the model's own abstract
    params (`jax.eval_shape` of its init, nothing allocated)."""
    tree = nn.unbox(abstract_params(make_model(config)))
    return {path: tuple(leaf.shape) for path, leaf in flatten(tree).items()}


def flatten(tree: Mapping[str, Any], prefix: Path_ = ()) -> dict[Path_, Any]:
    out: dict[Path_, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


def unflatten(flat: Mapping[Path_, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _shape_of(leaf: Any) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)  # arrays, and Orbax metadata before anything is read
    return tuple(shape) if shape is not None else tuple(np.shape(leaf))


def check_params(params: Mapping[str, Any], config: LlamaConfig, where: str = "params") -> None:
    """Raise ModelIOError naming every missing, unexpected or misshaped leaf (arrays, or the
    checkpoint's metadata tree, so a wrong checkpoint fails before any weight is read)."""
    expected = expected_param_shapes(config)
    flat = flatten(params)
    problems = []
    missing = [p for p in expected if p not in flat]
    unexpected = [p for p in flat if p not in expected]
    if missing:
        problems.append("missing " + ", ".join("/".join(p) for p in missing))
    if unexpected:
        problems.append("unexpected " + ", ".join("/".join(p) for p in unexpected))
    for path, shape in expected.items():
        if path in flat and _shape_of(flat[path]) != tuple(shape):
            problems.append(f"{'/'.join(path)} has shape {_shape_of(flat[path])}, the "
                            f"config implies {tuple(shape)}")
    if problems:
        raise ModelIOError(
            f"{where} do not match the model config ({config.num_hidden_layers} layers, hidden "
            f"{config.hidden_size}, vocab {config.vocab_size}, tie_word_embeddings="
            f"{config.tie_word_embeddings}): " + "; ".join(problems))


def place_leaves(leaves: Iterable[tuple[Path_, np.ndarray]], shardings: Any) -> dict:
    """A params tree of `jax.Array`s, each host leaf put into its sharding as it arrives and
    then dropped: host memory holds one leaf at a time beyond what the caller keeps. Every
    process supplies only the shards its own devices hold (`make_array_from_callback`)."""
    flat_shardings = flatten(shardings)
    out = {}
    for path, host in leaves:
        if path not in flat_shardings:
            raise ModelIOError(f"no sharding for params leaf {'/'.join(path)}")
        out[path] = jax.make_array_from_callback(host.shape, flat_shardings[path],
                                                 _slicer(host))
        del host
    return unflatten(out)


def _slicer(host: np.ndarray) -> Callable[[Any], np.ndarray]:
    return lambda index: host[index]


def place_params(params: dict, shardings: Any) -> dict:
    """`place_leaves` of a numpy params tree that the caller hands over: each leaf is popped
    from `params` as it is placed, so the host copy shrinks as the device copy grows."""
    flat = flatten(params)
    params.clear()

    def leaves():
        while flat:
            path = next(iter(flat))
            yield path, flat.pop(path)

    return place_leaves(leaves(), shardings)
