"""Decode attention over the `[B, K, S, Dh]` cache layout (`layers.cached_attention`) equals
XLA's reference attention over the same keys and values in the `[B, S, K, Dh]` layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sorted_jax.model.layers import cached_attention


@pytest.mark.parametrize("heads,kv_heads,t", [(4, 2, 1), (4, 2, 5), (4, 4, 3), (6, 1, 2)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_equals_reference(heads, kv_heads, t, dtype, tol):
    b, s, dh = 3, 11, 8
    kq, kk, kv, km = jax.random.split(jax.random.PRNGKey(heads * 10 + t), 4)
    q = jax.random.normal(kq, (b, t, heads, dh), dtype)
    k = jax.random.normal(kk, (b, kv_heads, s, dh), dtype)
    v = jax.random.normal(kv, (b, kv_heads, s, dh), dtype)
    # per row and query its own visible slots (rows of different lengths, causal within the
    # new tokens), at least one each
    mask = jax.random.bernoulli(km, 0.6, (b, 1, t, s)).at[..., 0].set(True)
    got = cached_attention(q, k, v, mask)
    want = jax.nn.dot_product_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask=mask,
                                        implementation="xla")
    assert got.shape == want.shape == (b, t, heads, dh) and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tol, rtol=tol)
    # a query's output moves when a key it sees moves, and not when one it does not see does
    hidden = ~mask[0, 0, 0]
    if bool(jnp.any(hidden)):
        slot = int(jnp.argmax(hidden))
        moved = cached_attention(q, k.at[0, :, slot].add(5.0), v.at[0, :, slot].add(5.0), mask)
        np.testing.assert_array_equal(np.asarray(moved[0, 0]), np.asarray(got[0, 0]))
