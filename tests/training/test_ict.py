"""SFT+ICT (`objective.heads`, `training.ict_trainer`, `python -m sorted_jax.ict`): only the
per-exit heads train (trunk bitwise unchanged), their loss falls, the saved artifact reloads,
and heads equal to the shared head reproduce SoftSteps' eval."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import BYTE_4L, one_device_mesh, random_params, tiny_model_dir

import sorted_jax.objective.heads as ict_heads
from sorted_jax import ict
from sorted_jax.data import EvalIterator, builtin_records, tokenize_records
from sorted_jax.data.tokenizers import ByteTokenizer
from sorted_jax.io import ict_dir, model_io
from sorted_jax.model.modeling import make_model
from sorted_jax.objective import soft
from sorted_jax.training.ict_trainer import IctTrainer
from sorted_jax.training.train_step import SoftSteps, to_global_batch

CFG = BYTE_4L
EXITS = (1, 2, 4)
MAX_LEN = 48


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("ict") / "sft", CFG)


@pytest.fixture(scope="module")
def dataset():
    return tokenize_records(builtin_records("train", num_train=64), ByteTokenizer(), MAX_LEN,
                            "plain")


def test_init_heads_and_exit_model():
    params = random_params(CFG)
    heads = ict_heads.init_heads(params, CFG, [4, 2])
    assert heads.exits == (2, 4)
    chex.assert_shape(heads.norm_scale, (2, 32))
    chex.assert_shape(heads.lm_head_kernel, (2, 32, 264))
    np.testing.assert_array_equal(heads.lm_head_kernel[1], params["lm_head"]["kernel"])
    heads.lm_head_kernel[0] += 1.0
    p2, c2 = ict_heads.exit_model(params, CFG, heads, 2)
    np.testing.assert_array_equal(p2["lm_head"]["kernel"], params["lm_head"]["kernel"] + 1.0)
    assert p2["layers"] is params["layers"] and c2 == CFG
    with pytest.raises(ict_heads.IctError, match="no ICT head for exit 3"):
        ict_heads.exit_model(params, CFG, heads, 3)
    tied = CFG.replace(tie_word_embeddings=True)
    tied_params = {k: v for k, v in params.items() if k != "lm_head"}
    th = ict_heads.init_heads(tied_params, tied, [2])
    np.testing.assert_array_equal(th.lm_head_kernel[0], params["embed_tokens"]["embedding"].T)
    p3, c3 = ict_heads.exit_model(tied_params, tied, th, 2)
    assert not c3.tie_word_embeddings and "lm_head" in p3


def test_shared_heads_reproduce_softsteps_eval(dataset):
    """ICT eval with every head = the shared head gives SoftSteps.eval_step's sums."""
    params = random_params(CFG)
    mesh = one_device_mesh()
    model = make_model(CFG)
    steps = SoftSteps(model, EXITS, optax.identity(), mesh)
    heads = ict_heads.init_heads(params, CFG, EXITS)
    hev = ict_heads.HeadsEval(model, EXITS, mesh)
    tree = {k: jnp.asarray(v) for k, v in heads.tree().items()}
    batch = to_global_batch(next(iter(EvalIterator(dataset, 8))), steps.batch_shardings)
    a = jax.device_get(steps.eval_step(params, batch))
    b = jax.device_get(hev.eval_step(params, tree, batch))
    chex.assert_trees_all_close(b.loss, a.loss, rtol=1e-5)
    np.testing.assert_array_equal(b.correct, a.correct)
    assert float(a.tokens) == float(b.tokens) > 0


def test_train_heads_only_heads_change_and_loss_falls(dataset):
    params = random_params(CFG)
    before = jax.tree.map(np.copy, params)
    mesh = one_device_mesh()
    model = make_model(CFG)
    tx = optax.adam(3e-2)
    trainer = IctTrainer(model, EXITS, tx, mesh)
    init = ict_heads.init_heads(params, CFG, EXITS)
    p_dev, heads, opt = trainer.place(params, init)
    batch = to_global_batch(next(iter(EvalIterator(dataset, 8))), trainer.batch_shardings)
    loss0 = trainer.loss(p_dev, heads, batch)

    for _ in range(8):
        heads, opt, metrics = trainer.train_step(p_dev, heads, opt, batch)
    assert trainer.loss(p_dev, heads, batch) < loss0 - 0.1
    assert np.isfinite(float(metrics["loss"]))
    chex.assert_trees_all_equal(jax.device_get(p_dev), before)
    chex.assert_trees_all_equal(params, before)
    host = jax.device_get(heads)
    for k in range(len(EXITS)):  # every head moved away from the shared init
        assert not np.array_equal(host["lm_head_kernel"][k], init.lm_head_kernel[k])
        assert not np.array_equal(host["norm_scale"][k], init.norm_scale[k])


def test_cli_writes_loadable_artifact(sft_dir, tmp_path, capsys):
    out = tmp_path / "sft_ict"
    rc = ict.main(["--ckpt", str(sft_dir), "--data", "builtin", "--out", str(out),
                   "--exits", "2,4", "--num-steps", "6", "--batch-size", "8", "--lr", "1e-2",
                   "--template", "plain", "--max-len", str(MAX_LEN), "--mesh", "1,1,1",
                   "--log-every", "3"])
    assert rc == 0, capsys.readouterr().err
    # the trunk is the SFT model, bitwise; the artifact is also a plain model dir
    src, _ = model_io.load_model_dir(sft_dir)
    got, cfg = model_io.load_model_dir(out)
    assert cfg == CFG
    chex.assert_trees_all_equal(got, src)
    heads = ict_dir.load_heads(out, CFG)
    assert heads is not None and heads.exits == (2, 4)
    init = ict_heads.init_heads(src, CFG, (2, 4))
    assert not np.array_equal(heads.lm_head_kernel, init.lm_head_kernel)
    meta = ict_dir.read_meta(out)
    assert meta["exits"] == [2, 4] and meta["template"] == "plain" and meta["num_steps"] == 6
    assert [h["step"] for h in meta["history"]] == [1, 3, 6]
    assert ict_dir.load_heads(sft_dir, CFG) is None
    # a second run refuses to overwrite, and an ICT dir is not an SFT model to start from
    rc = ict.main(["--ckpt", str(out), "--data", "builtin", "--out", str(tmp_path / "x"),
                   "--num-steps", "1", "--mesh", "1,1,1"])
    assert rc == 2 and "already has ICT heads" in capsys.readouterr().err


def test_bad_heads_dir(sft_dir, tmp_path):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(sft_dir, d)
    model_io.save_params(d / ict_dir.HEADS_DIR, {"norm_scale": np.ones((1, 32), np.float32)})
    with pytest.raises(ict_heads.IctError, match="ict.json"):
        ict_dir.load_heads(d, CFG)
    (d / ict_dir.ICT_FILE).write_text('{"exits": [2]}')
    with pytest.raises(ict_heads.IctError, match="lacks"):
        ict_dir.load_heads(d, CFG)
    bad = ict_heads.IctHeads((2,), np.ones((1, 32)), np.ones((1, 16, 264)))
    with pytest.raises(ict_heads.IctError, match="lm_head_kernel has shape"):
        ict_heads.check_heads(bad, CFG)
    with pytest.raises(soft.ExitError):
        ict_heads.init_heads(random_params(CFG), CFG, [5])
