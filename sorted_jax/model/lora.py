"""LoRA and QLoRA on the scanned trunk: low-rank adapters beside a frozen (quantised) base.

Each targeted projection of a layer (`q,k,v,o,gate,up,down`) gets `lora_a` `[*in, r]` and
`lora_b` `[r, *out]` beside its `kernel` `[*in, *out]`, inside the same Flax module, so under
`nn.scan` they are stacked `[L, ...]` like the base weights (depth-k slicing keeps working) and
carry the base's logical axis names on their `in` / `out` axes (the rank axis, `lora_rank`, is
replicated): they shard as their base weight does. The layer computes

    y = x @ W + (alpha / r) * ((dropout(x) @ A) @ B)

with the frozen W applied through `frozen_einsum`, a custom VJP whose backward pass only
computes dx (recomputing W from its stored form): no gradient of W, and no dequantised copy of
W kept per layer for the backward pass. W + A @ B is never formed while training; it is formed
once, at load time, by `merge` (what every downstream command runs).

The base is frozen: `trainable` picks the adapters (and the norms with `train_norms`), and the
train step keeps everything else out of the train state (`train_step.SoftSteps`): no gradient,
no optimizer state, no fp32 master copy, not in checkpoints. A quantised base (`int8`, `int4`,
`nf4`: `sorted_jax.model.quant`) stores each layer kernel as `kernel_q` + `kernel_scale`
(`quantise_base`) and is dequantised per layer inside the scan.

`B = 0` at init (A is PEFT's kaiming-uniform), so step 0 is the base model exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax.model import quant
from sorted_jax.model.config import ConfigError

Array = jax.Array
PathT = tuple[str, ...]

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# target -> (the module's parent, its name) inside a layer; the HF / PEFT name is "parent.name"
MODULES = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"),
           "v": ("self_attn", "v_proj"), "o": ("self_attn", "o_proj"),
           "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"), "down": ("mlp", "down_proj")}
TARGET_OF = {name: t for t, (_, name) in MODULES.items()}
# The model-width (embed) axis of each per-layer kernel: where a quantised base is blocked.
EMBED_AXIS = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 2, "gate_proj": 0,
              "up_proj": 0, "down_proj": 1}
BASE_DTYPES = ("float32", "bfloat16", *quant.KINDS)
LORA_A, LORA_B, KERNEL_Q, KERNEL_SCALE = "lora_a", "lora_b", "kernel_q", "kernel_scale"
RANK_AXIS = "lora_rank"  # the adapters' rank axis: in no rule, so replicated


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """A LoRA run's adapters and base (`lora.*` in the training config)."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    base_dtype: str = "bfloat16"
    train_norms: bool = False
    adapter_dtype: str = "float32"  # the adapters' (trained) dtype: the run's param_dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or int(self.rank) != self.rank or self.rank < 1:
            raise ConfigError(f"lora.rank must be an integer >= 1 for a LoRA run (0 = full "
                              f"fine-tuning), got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0 (the update is scaled by alpha / rank), "
                              f"got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora.targets must be distinct names from {','.join(TARGETS)}, "
                              f"got {','.join(self.targets) or 'none'}"
                              + (f" (unknown: {','.join(unknown)})" if unknown else ""))
        if self.base_dtype not in BASE_DTYPES:
            raise ConfigError(f"lora.base_dtype must be one of {', '.join(BASE_DTYPES)}, got "
                              f"{self.base_dtype!r}")

    @property
    def scaling(self) -> float:
        return float(self.alpha) / int(self.rank)

    @property
    def quantised(self) -> bool:
        return self.base_dtype in quant.KINDS

    @property
    def float_dtype(self) -> Any:
        """The dtype of the base's unquantised leaves (embeddings, norms, head)."""
        return jnp.float32 if self.base_dtype == "float32" else jnp.bfloat16

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraSpec:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def parse_targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in str(text).split(",") if t.strip())


def check_model(spec: LoraSpec, hidden_size: int) -> None:
    """What the model's shapes must allow: a quantised base blocks the model width."""
    if spec.quantised:
        why = quant.check_blockable(hidden_size)
        if why:
            raise ConfigError(f"lora.base_dtype={spec.base_dtype}: {why}")


# ---------------------------------------------------------------------------------------------
# inside the layer


def _zero_cotangent(x: Array) -> Array:
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def stored_kernel(parts: tuple[Array, ...], kind: str | None, axis: int, dtype: Any) -> Array:
    """The kernel in `dtype` from its stored form: (kernel,) or (codes, scale)."""
    if kind is None:
        return parts[0].astype(dtype)
    return quant.dequantise(parts[0], parts[1], axis, kind, dtype)


def frozen_einsum(equation: str, x: Array, parts: tuple[Array, ...], kind: str | None,
                  axis: int) -> Array:
    """`einsum(equation, x, W)` for a frozen W stored as `parts`: the backward pass computes dx
    only, from W rebuilt from `parts` (its residuals are `parts` themselves, the scan's own
    slices, so nothing the size of the stack is saved for it)."""
    x_aval = jax.ShapeDtypeStruct(x.shape, x.dtype)

    def apply(x_: Array, w: Array) -> Array:
        return jnp.einsum(equation, x_, w)

    @jax.custom_vjp
    def f(x_: Array, parts_: tuple[Array, ...]) -> Array:
        return apply(x_, stored_kernel(parts_, kind, axis, x_.dtype))

    def fwd(x_, parts_):
        return f(x_, parts_), parts_

    def bwd(parts_, g):
        w = stored_kernel(parts_, kind, axis, x_aval.dtype)
        (dx,) = jax.linear_transpose(lambda v: apply(v, w), x_aval)(g)
        return dx, tuple(_zero_cotangent(p) for p in parts_)

    f.defvjp(fwd, bwd)
    return f(x, parts)


def adapter_equations(equation: str) -> tuple[str, str, int]:
    """("x,A->xr", "xr,B->y", number of contracted kernel axes) for a projection `equation`
    whose kernel is laid out [contracted axes..., output axes...]."""
    ins, out = equation.split("->")
    lhs, rhs = ins.split(",")
    contracted = [c for c in rhs if c in lhs and c not in out]
    kept = rhs[len(contracted):]
    batch = "".join(c for c in lhs if c not in contracted)
    return (f"{lhs},{''.join(contracted)}r->{batch}r", f"{batch}r,r{kept}->{out}",
            len(contracted))


def kaiming_uniform_a(names: tuple[str, ...]) -> Callable[..., Array]:
    """PEFT's init of lora_A: kaiming-uniform with a = sqrt(5), i.e. U(+-1 / sqrt(fan_in))."""
    def init(rng: Array, shape: tuple[int, ...], dtype: Any) -> Array:
        bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
        return jax.random.uniform(rng, shape, dtype, -bound, bound)

    return nn.with_logical_partitioning(init, names)


# ---------------------------------------------------------------------------------------------
# params trees


def is_adapter(path: PathT) -> bool:
    return bool(path) and path[-1] in (LORA_A, LORA_B)


def is_norm(path: PathT) -> bool:
    return len(path) >= 2 and path[-1] == "scale" and path[-2].endswith("norm")


def trainable(spec: LoraSpec) -> Callable[[PathT], bool]:
    """The path predicate of what a LoRA run trains."""
    return lambda path: is_adapter(path) or (spec.train_norms and is_norm(path))


def split_tree(tree: Mapping[str, Any], keep: Callable[[PathT], bool], prefix: PathT = ()
               ) -> tuple[dict, dict]:
    """(leaves whose path `keep`s, the rest) of a nested dict; empty branches dropped."""
    a: dict = {}
    b: dict = {}
    for k, v in tree.items():
        path = (*prefix, str(k))
        if isinstance(v, Mapping):
            x, y = split_tree(v, keep, path)
            if x:
                a[k] = x
            if y:
                b[k] = y
        elif keep(path):
            a[k] = v
        else:
            b[k] = v
    return a, b


def merge_trees(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict:
    """The union of two nested dicts with disjoint leaves."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if k in out and isinstance(v, Mapping) else v
    return out


def has_adapters(tree: Mapping[str, Any]) -> bool:
    def walk(t: Any, path: PathT) -> bool:
        if isinstance(t, Mapping):
            return any(walk(v, (*path, str(k))) for k, v in t.items())
        return is_adapter(path)

    return walk(tree, ())


def quantised_kernel_path(path: PathT) -> str | None:
    """The projection's name when `path` is a layer kernel that a quantised base stores as
    codes + scales (`layers/.../<name>/kernel`), else None."""
    if len(path) >= 3 and path[0] == "layers" and path[-1] == "kernel" and path[-2] in EMBED_AXIS:
        return path[-2]
    return None


def quantise_leaf(path: PathT, leaf: Any, kind: str) -> dict[str, Any] | None:
    """{kernel_q, kernel_scale} for a stacked layer kernel (a boxed or abstract one too),
    None for any other leaf."""
    name = quantised_kernel_path(path)
    if name is None:
        return None
    axis = EMBED_AXIS[name] + 1  # the stacked layer axis comes first
    boxed = isinstance(leaf, nn.LogicallyPartitioned)
    value = leaf.value if boxed else leaf
    fn = lambda w: quant.quantise(w, axis, kind)  # noqa: E731
    q, s = (jax.eval_shape(fn, value) if isinstance(value, jax.ShapeDtypeStruct)
            else fn(value))
    if boxed:
        q, s = leaf.replace_boxed(q), leaf.replace_boxed(s)
    return {KERNEL_Q: q, KERNEL_SCALE: s}


def quantise_base(frozen: Mapping[str, Any], spec: LoraSpec) -> dict:
    """The frozen tree as the step holds it: layer kernels as codes + scales when the base is
    quantised (every other leaf unchanged)."""
    if not spec.quantised:
        return dict(frozen)

    def walk(t: Mapping[str, Any], path: PathT) -> dict:
        out: dict = {}
        for k, v in t.items():
            p = (*path, str(k))
            if isinstance(v, Mapping):
                out[k] = walk(v, p)
                continue
            q = quantise_leaf(p, v, spec.base_dtype)
            if q is None:
                out[k] = v
            else:
                out.update(q)
        return out

    return walk(frozen, ())


def delta(a: Any, b: Any) -> np.ndarray:
    """A @ B in fp32 in the kernel's layout: A `[L, *in, r]`, B `[L, r, *out]`."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    big_l, r = a.shape[0], a.shape[-1]
    out = np.matmul(a.reshape(big_l, -1, r), b.reshape(big_l, r, -1))
    return out.reshape(*a.shape[:-1], *b.shape[2:])


def merge(base: Mapping[str, Any], trained: Mapping[str, Any], spec: LoraSpec,
          dtype: Any = None) -> dict:
    """The plain params of the trained model: `kernel + (alpha / r) A @ B` for every adapted
    projection (over the dequantised kernel when the base was quantised: the model the run
    trained), trained norms in place of the base's. numpy leaves in `dtype` (default: the
    base's); `trained` is the checkpoint's params (adapters, norms)."""
    adapters, norms = split_tree(trained, is_adapter)
    replaced = _paths(norms)
    out = merge_trees(split_tree(base, lambda p: p in replaced)[1], norms)

    def walk(node: dict, path: PathT) -> None:
        for k, v in list(node.items()):
            p = (*path, str(k))
            if isinstance(v, dict):
                walk(v, p)
                continue
            w = np.asarray(v)
            name = quantised_kernel_path(p)
            if name is not None:
                w32 = w.astype(np.float32)
                if spec.quantised:
                    axis = EMBED_AXIS[name] + 1
                    q, s = quant.quantise(w32, axis, spec.base_dtype)
                    w32 = np.asarray(quant.dequantise(q, s, axis, spec.base_dtype, jnp.float32))
                ad = _get(adapters, p[:-1])
                if ad is not None:
                    w32 = w32 + spec.scaling * delta(ad[LORA_A], ad[LORA_B])
                w = w32.astype(w.dtype)
            node[k] = w if dtype is None else w.astype(dtype)

    out = jax.tree.map(lambda x: x, out)  # a fresh nested dict
    walk(out, ())
    return out


def _paths(tree: Mapping[str, Any], prefix: PathT = ()) -> set[PathT]:
    out: set[PathT] = set()
    for k, v in tree.items():
        p = (*prefix, str(k))
        out |= _paths(v, p) if isinstance(v, Mapping) else {p}
    return out


def _get(tree: Mapping[str, Any], path: PathT) -> Any:
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def fingerprint(params: Mapping[str, Any]) -> str:
    """A short hash of a set of weights: every leaf's path and shape and 4096 of its values
    (evenly spaced, as bf16, so a bf16 and an fp32 copy of the same weights agree)."""
    h = hashlib.sha256()
    flat = sorted((("/".join(p), x) for p, x in _flat(params)), key=lambda t: t[0])
    for name, x in flat:
        n = int(np.prod(x.shape))
        idx = np.unique(np.linspace(0, max(n - 1, 0), min(n, 4096)).astype(np.int64))
        sample = _sample(x, idx)
        h.update(f"{name}:{tuple(x.shape)}".encode())
        h.update(np.asarray(sample, np.float32).astype(jnp.bfloat16).tobytes())
    return h.hexdigest()[:16]


def _flat(tree: Mapping[str, Any], prefix: PathT = ()) -> list[tuple[PathT, Any]]:
    out = []
    for k, v in tree.items():
        p = (*prefix, str(k))
        out += _flat(v, p) if isinstance(v, Mapping) else [(p, v)]
    return out


def _sample(x: Any, idx: np.ndarray) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.reshape(-1)[idx]
    return np.asarray(jax.jit(lambda a: jnp.ravel(a)[idx])(x))
