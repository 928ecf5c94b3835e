"""Block-quantised frozen weights for QLoRA: int8, int4 and NF4 with one absmax per 64 values.

A kernel is cut into blocks of `BLOCK` consecutive values along its model-width (`embed`) axis,
the one axis every projection of a LLaMA layer has (q/k/v `[D, H, Dh]`, o `[H, Dh, D]`, gate/up
`[D, F]`, down `[F, D]`). Each block stores its absolute maximum (fp32) and one code per value:

    int8   round(127 x / absmax)                          1 byte per value
    int4   round(7 x / absmax) + 8, two codes per byte    0.5 byte per value
    nf4    the nearest of QLoRA's 16 NormalFloat levels    0.5 byte per value
           (Dettmers et al. 2023, Appendix E), two per byte

so a 4-bit base costs 4.5 bits per value (the scale: 32 bits per 64 values). Codes keep the
kernel's shape (4-bit: its `embed` axis halved by the packing) and its logical axis names, so a
quantised kernel shards like the float one; scales are `[..., D / 64, ...]`, named the same.
`dequantise` runs per layer inside the scan (`lora.frozen_einsum`), never on the whole stack.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BLOCK = 64
KINDS = ("int8", "int4", "nf4")
FOUR_BIT = ("int4", "nf4")

# QLoRA's NormalFloat4: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
# int4 as a codebook: code c is (c - 8) / 7 (code 0, -8/7, is never written).
INT4 = (np.arange(16, dtype=np.float32) - 8) / 7


def check_blockable(dim: int, what: str = "hidden_size") -> str | None:
    """Why a width cannot be quantised in blocks (None: it can)."""
    if dim % BLOCK:
        return (f"{what}={dim} is not a multiple of the quantisation block ({BLOCK}): a "
                "quantised base needs whole blocks of 64 along the model width")
    return None


def _blocks(x: Array, axis: int) -> Array:
    """`[..., D, ...]` -> `[..., D / BLOCK, BLOCK, ...]`."""
    shape = x.shape
    return x.reshape(*shape[:axis], shape[axis] // BLOCK, BLOCK, *shape[axis + 1:])


def _codebook(kind: str) -> np.ndarray:
    return NF4 if kind == "nf4" else INT4


def quantise(w: Array, axis: int, kind: str) -> tuple[Array, Array]:
    """(codes, fp32 absmax per block) of `w` blocked along `axis` (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantisation {kind!r}; known: {KINDS}")
    blocks = _blocks(jnp.asarray(w, jnp.float32), axis)
    scale = jnp.max(jnp.abs(blocks), axis=axis + 1, keepdims=True)
    x = blocks / jnp.where(scale > 0, scale, 1.0)
    if kind == "int8":
        codes = jnp.clip(jnp.round(x * 127), -127, 127).astype(jnp.int8)
        return codes.reshape(w.shape), jnp.squeeze(scale, axis + 1)
    book = _codebook(kind)
    mids = (book[1:] + book[:-1]) / 2
    codes = jnp.zeros(x.shape, jnp.uint8)
    first = 1 if kind == "int4" else 0  # int4 never uses code 0
    for m in mids[first:]:
        codes = codes + (x > m).astype(jnp.uint8)
    codes = (codes + first).reshape(w.shape)
    pairs = codes.reshape(*w.shape[:axis], w.shape[axis] // 2, 2, *w.shape[axis + 1:])
    lo, hi = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
    return (lo | (hi << 4)).astype(jnp.uint8), jnp.squeeze(scale, axis + 1)


def dequantise(codes: Array, scale: Array, axis: int, kind: str, dtype: Any) -> Array:
    """The kernel back from (codes, scale), in `dtype` (computed in fp32)."""
    if kind == "int8":
        values = codes.astype(jnp.float32) / 127
    else:
        lo, hi = codes & 15, codes >> 4
        both = jnp.stack([lo, hi], axis=axis + 1)
        shape = codes.shape
        idx = both.reshape(*shape[:axis], shape[axis] * 2, *shape[axis + 1:])
        values = jnp.asarray(_codebook(kind))[idx.astype(jnp.int32)]
    blocks = _blocks(values, axis) * jnp.expand_dims(scale, axis + 1)
    return blocks.reshape(values.shape).astype(dtype)


def stored_shapes(shape: tuple[int, ...], axis: int, kind: str
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(codes shape, scale shape) of a kernel of `shape` blocked along `axis`."""
    codes = list(shape)
    if kind in FOUR_BIT:
        codes[axis] //= 2
    scale = list(shape)
    scale[axis] //= BLOCK
    return tuple(codes), tuple(scale)


def codes_dtype(kind: str) -> Any:
    return jnp.int8 if kind == "int8" else jnp.uint8


def bits_per_value(kind: str) -> float:
    """Stored bits per kernel value, scales included."""
    return (8.0 if kind == "int8" else 4.0) + 32.0 / BLOCK
