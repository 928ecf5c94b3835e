"""Branches of a decode step update the KV caches in place (`decoding.inplace`).

What XLA compiled is checked, not only the output: the decode loop of every layout holds no
copy of a KV cache. Under `lax.cond` / `lax.switch` XLA:CPU copied each cache that went through
a branch, in and out of every step (1.5x the full model's step time for a speculative round
that drafted nothing, on the tiny SoFT model at batch 16). Known and left: a segment of one
layer (adjacent exits, a depth-1 draft) still gets copies, where XLA fuses the cache write into
both of its readers.
"""

from __future__ import annotations

import re

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import GQA_4L

from sorted_jax.decoding import Decoder
from sorted_jax.decoding.inplace import run_case, run_if


def test_run_if_and_run_case_pick_their_branch():
    x = {"a": jnp.arange(3.0), "b": jnp.ones((), jnp.int32)}

    def double(t):
        return {"a": 2 * t["a"], "b": t["b"] + 1}

    for pred in (True, False):
        got = jax.jit(lambda p, t: run_if(p, double, t))(jnp.asarray(pred), x)
        want = double(x) if pred else x
        np.testing.assert_array_equal(got["a"], want["a"])
        assert int(got["b"]) == int(want["b"])
    branches = [lambda t, k=k: t * 10 + k for k in range(3)]
    for i in range(3):
        got = jax.jit(lambda j, t: run_case(j, branches, t))(jnp.asarray(i), jnp.arange(2.0))
        np.testing.assert_array_equal(got, jnp.arange(2.0) * 10 + i)


def _compiled_loop_text(dec: Decoder, prompts, **options) -> tuple[str, set[str]]:
    """(the compiled decode loop's HLO, the shapes of its KV-cache buffers as HLO types)."""
    route, progs, params, ctl, inputs, slots = dec._start(prompts, dec.options(**options))
    st = progs.prefill_shape(params, *inputs, slots=slots)
    caches = [c for c in (*st.caches, *st.acaches) if c is not None]
    shapes = {f"f32[{','.join(map(str, c.k.shape))}]" for c in caches}
    return progs.compiled_loop(params, st, ctl).as_text(), shapes


@pytest.mark.parametrize("options", [
    dict(),  # the full model
    dict(mode="speculative", draft_layer=2),
    dict(mode="early-exit", exits=(2, 4), thresholds=(0.9,)),
], ids=["full", "speculative", "early-exit"])
def test_decode_loop_never_copies_a_cache(options):
    params = helpers.random_params(GQA_4L, 0, std=0.08, as_jax=True)
    dec = Decoder(params, GQA_4L, max_draft=6)  # what users compile (FAST skips passes)
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10]]
    text, shapes = _compiled_loop_text(dec, prompts, max_new_tokens=8, max_len=32, **options)
    assert shapes and all(s in text for s in shapes)  # the caches are there, by these shapes
    copies = [line.strip()[:160] for line in text.splitlines()
              if re.search(r"= (\w+\[[\d,]*\])\{[^}]*\} (copy|fusion)\(", line)
              and re.search(r"= (\w+\[[\d,]*\])", line).group(1) in shapes
              and re.search(r"%\S*copy\S* = |\bcopy\(", line)]
    assert not copies, "\n".join(copies)
