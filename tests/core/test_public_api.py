"""The notebook API in `sorted_jax/__init__.py`: lazy, and each name does what it says."""

from __future__ import annotations

import subprocess
import sys

import helpers
import jax
import jax.numpy as jnp
import numpy as np
from helpers import BYTE_4L, GQA_4L

import sorted_jax as sj


def test_import_is_light_and_every_public_name_resolves():
    code = "import sys, sorted_jax; print('jax' in sys.modules, 'flax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]
    for name in sj.__all__:
        assert getattr(sj, name) is not None, name


def test_exit_logits_equal_the_every_layer_forward_and_the_adapted_submodel():
    params = helpers.random_params(GQA_4L, 0, as_jax=True)
    ids = jnp.asarray([[1, 5, 9, 13, 2, 7]])
    model = sj.make_model(GQA_4L)
    every = model.apply({"params": params}, ids).hidden  # [L, B, T, D]
    for k in (1, 3, 4):
        want = model.apply({"params": params}, every[k - 1], method="head")
        np.testing.assert_allclose(sj.exit_logits(params, GQA_4L, ids, k), want, atol=1e-5)
    # with an adapter at exit 2: the plain 3-layer sub-model (layers 0, 1, then the adapter)
    cfg = GQA_4L.replace(exit_adapters=(2,))
    adapted = helpers.random_params(cfg, 1, as_jax=True)
    sub = {**{k: v for k, v in adapted.items() if k != "exit_adapters"}, "layers": jax.tree.map(
        lambda w, a: jnp.concatenate([w[:2], a], 0), adapted["layers"],
        adapted["exit_adapters"])}
    plain = sj.make_model(cfg.layers_config(3))
    want = plain.apply({"params": sub}, plain.apply({"params": sub}, ids).hidden[-1],
                       method="head")
    np.testing.assert_allclose(sj.exit_logits(adapted, cfg, ids, 2), want, atol=1e-5)


def test_load_model_and_decode(tmp_path):
    d = helpers.tiny_model_dir(tmp_path / "m", BYTE_4L)
    m = sj.load_model(d)
    assert m.config == BYTE_4L and m.tokenizer is not None
    ids = m.tokenizer.encode("hi")
    out = sj.Decoder(m.params, m.config, compiler_options=helpers.FAST).generate(
        [ids], mode="fixed", exit_layer=2, max_new_tokens=3, max_len=16)
    assert len(out.tokens[0]) == 3
    logits = sj.exit_logits(m.params, m.config, [ids], 2)
    assert int(jnp.argmax(logits[0, -1])) == out.tokens[0][0]
