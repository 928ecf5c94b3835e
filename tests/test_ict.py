"""SFT+ICT: only the per-exit heads train (trunk bitwise unchanged), their loss falls, the
saved artifact reloads, and heads equal to the shared head reproduce SoftSteps' eval."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sorted_jax import ict, model_io, soft
from sorted_jax.config import LlamaConfig
from sorted_jax.data import EvalIterator, builtin_records, tokenize_records
from sorted_jax.data.tokenizers import ByteTokenizer, save_tokenizer_files
from sorted_jax.modeling import abstract_params, make_model
from sorted_jax.sharding import make_mesh
from sorted_jax.train_step import SoftSteps, to_global_batch

CFG = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
EXITS = (1, 2, 4)
MAX_LEN = 48


def random_params(config: LlamaConfig, seed: int = 0) -> dict:
    """numpy weights; norm scales random (ones would hide a skipped norm)."""
    shapes = nn.unbox(abstract_params(make_model(config)))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return (1.0 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def one_device_mesh():
    return make_mesh((1, 1, 1), jax.devices()[:1])


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ict") / "sft"
    model_io.save_model_dir(d, random_params(CFG), CFG)
    save_tokenizer_files("builtin", d)
    return d


@pytest.fixture(scope="module")
def dataset():
    return tokenize_records(builtin_records("train", num_train=64), ByteTokenizer(), MAX_LEN,
                            "plain")


def test_init_heads_and_exit_model():
    params = random_params(CFG)
    heads = ict.init_heads(params, CFG, [4, 2])
    assert heads.exits == (2, 4)
    assert heads.norm_scale.shape == (2, 32) and heads.lm_head_kernel.shape == (2, 32, 264)
    np.testing.assert_array_equal(heads.lm_head_kernel[1], params["lm_head"]["kernel"])
    heads.lm_head_kernel[0] += 1.0
    p2, c2 = ict.exit_model(params, CFG, heads, 2)
    np.testing.assert_array_equal(p2["lm_head"]["kernel"], params["lm_head"]["kernel"] + 1.0)
    assert p2["layers"] is params["layers"] and c2 == CFG
    with pytest.raises(ict.IctError, match="no ICT head for exit 3"):
        ict.exit_model(params, CFG, heads, 3)
    tied = CFG.replace(tie_word_embeddings=True)
    tied_params = {k: v for k, v in params.items() if k != "lm_head"}
    th = ict.init_heads(tied_params, tied, [2])
    np.testing.assert_array_equal(th.lm_head_kernel[0], params["embed_tokens"]["embedding"].T)
    p3, c3 = ict.exit_model(tied_params, tied, th, 2)
    assert not c3.tie_word_embeddings and "lm_head" in p3


def test_shared_heads_reproduce_softsteps_eval(dataset):
    """ICT eval with every head = the shared head gives SoftSteps.eval_step's sums."""
    params = random_params(CFG)
    mesh = one_device_mesh()
    model = make_model(CFG)
    steps = SoftSteps(model, EXITS, optax.identity(), mesh)
    heads = ict.init_heads(params, CFG, EXITS)
    hev = ict.HeadsEval(model, EXITS, mesh)
    tree = {k: jnp.asarray(v) for k, v in heads.tree().items()}
    batch = to_global_batch(next(iter(EvalIterator(dataset, 8))), steps.batch_shardings)
    a = jax.device_get(steps.eval_step(params, batch))
    b = jax.device_get(hev.eval_step(params, tree, batch))
    np.testing.assert_allclose(b.loss, a.loss, rtol=1e-5)
    np.testing.assert_array_equal(b.correct, a.correct)
    assert float(a.tokens) == float(b.tokens) > 0


def test_train_heads_only_heads_change_and_loss_falls(dataset):
    params = random_params(CFG)
    before = jax.tree.map(np.copy, params)
    mesh = one_device_mesh()
    model = make_model(CFG)
    tx = optax.adam(3e-2)
    trainer = ict.IctTrainer(model, EXITS, tx, mesh)
    init = ict.init_heads(params, CFG, EXITS)
    p_dev, heads, opt = trainer.place(params, init)
    batch = to_global_batch(next(iter(EvalIterator(dataset, 8))), trainer.batch_shardings)
    loss0 = trainer.loss(p_dev, heads, batch)

    for _ in range(8):
        heads, opt, metrics = trainer.train_step(p_dev, heads, opt, batch)
    assert trainer.loss(p_dev, heads, batch) < loss0 - 0.1
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(p_dev), before)
    jax.tree.map(np.testing.assert_array_equal, params, before)
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
    jax.tree.map(np.testing.assert_array_equal, got, src)
    heads = ict.load_heads(out, CFG)
    assert heads is not None and heads.exits == (2, 4)
    init = ict.init_heads(src, CFG, (2, 4))
    assert not np.array_equal(heads.lm_head_kernel, init.lm_head_kernel)
    meta = ict.read_meta(out)
    assert meta["exits"] == [2, 4] and meta["template"] == "plain" and meta["num_steps"] == 6
    assert [h["step"] for h in meta["history"]] == [1, 3, 6]
    assert ict.load_heads(sft_dir, CFG) is None
    # a second run refuses to overwrite, and an ICT dir is not an SFT model to start from
    rc = ict.main(["--ckpt", str(out), "--data", "builtin", "--out", str(tmp_path / "x"),
                   "--num-steps", "1", "--mesh", "1,1,1"])
    assert rc == 2 and "already has ICT heads" in capsys.readouterr().err


def test_bad_heads_dir(sft_dir, tmp_path):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(sft_dir, d)
    model_io.save_params(d / ict.HEADS_DIR, {"norm_scale": np.ones((1, 32), np.float32)})
    with pytest.raises(ict.IctError, match="ict.json"):
        ict.load_heads(d, CFG)
    (d / ict.ICT_FILE).write_text('{"exits": [2]}')
    with pytest.raises(ict.IctError, match="lacks"):
        ict.load_heads(d, CFG)
    bad = ict.IctHeads((2,), np.ones((1, 32)), np.ones((1, 16, 264)))
    with pytest.raises(ict.IctError, match="lm_head_kernel has shape"):
        ict.check_heads(bad, CFG)
    with pytest.raises(soft.ExitError):
        ict.init_heads(random_params(CFG), CFG, [5])
