"""A LoRA run end to end through the commands: small checkpoints of the adapters only, an exact
resume, a resume against another base refused, bad `lora.*` input refused before anything is
written, and `generate`, `evaluate`, `ict` taking the run's workdir as a model."""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import REPO, TRAIN_SMALL_CONFIG, tiny_model_dir

from sorted_jax import evaluate, generate, ict, train
from sorted_jax.io import model_io
from sorted_jax.model import lora

CFG = TRAIN_SMALL_CONFIG.replace(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, num_hidden_layers=3,
                                 max_position_embeddings=64)


def argv(workdir, base, *extra):
    return ["train", f"--config={REPO / 'configs' / 'tiny.py'}", f"--workdir={workdir}",
            f"--config.init_from={base}", "--config.model.preset=", "--config.model.vocab_size=0",
            "--config.data.tokenizer=", "--config.exits=2,3", "--config.eval_exits=",
            "--config.batch_size=8", "--config.eval_batches=1", "--config.max_len=48",
            "--config.data.buckets=48", "--config.data.max_records=96",
            "--config.checkpoint_every=2", "--config.eval_every=0", "--config.log_every=1",
            "--config.optim.lr=1e-2", "--config.optim.warmup_steps=0",
            "--config.optim.schedule=constant", "--config.dtype=float32",
            "--config.attention_impl=xla", "--config.async_checkpointing=False",
            "--config.tensorboard=False", "--config.lora.rank=4", "--config.lora.alpha=8",
            "--config.lora.base_dtype=nf4", "--config.lora.dropout=0.1", *extra]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_bases")
    return tiny_model_dir(root / "base", CFG, seed=0), tiny_model_dir(root / "other", CFG, seed=1)


def arrays(workdir, step):
    path = workdir / "checkpoints" / str(step) / "state"
    return ocp.PyTreeCheckpointer().restore(path)


def snapshot(path):
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def one_error_line(capsys, match):
    err = capsys.readouterr().err
    assert err.startswith("sorted_jax.train: error: ") and err.count("\n") == 1, err
    assert match in err, err


def test_checkpoints_hold_the_adapters_and_resume_exactly(bases, tmp_path, capsys):
    base, other = bases
    straight = tmp_path / "straight"
    assert train.main(argv(straight, base, "--config.num_steps=4")) == 0
    state = arrays(straight, 4)  # {params, opt_state, step}: the adapters' only
    paths = [p for p, _ in lora._flat(state["params"])]
    assert paths and all(lora.is_adapter(p) for p in paths)
    adapter_shapes = {x.shape for x in jax.tree.leaves(state["params"])}
    assert {x.shape for x in jax.tree.leaves(state["opt_state"]) if x.ndim} <= adapter_shapes
    size = sum(f.stat().st_size for f in (straight / "checkpoints" / "4").rglob("*"))
    base_size = sum(f.stat().st_size for f in (base / "params").rglob("*"))
    assert size < base_size
    meta = model_io.read_workdir_meta(straight, 4)["lora"]
    assert meta["init_from"] == str(base) and meta["spec"]["base_dtype"] == "nf4"

    resumed = tmp_path / "resumed"
    assert train.main(argv(resumed, base, "--config.num_steps=2")) == 0
    assert train.main(argv(resumed, base, "--config.num_steps=4")) == 0
    assert "from step 2" in capsys.readouterr().out
    a, b = arrays(straight, 4), arrays(resumed, 4)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    losses = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").open()
              if '"train"' in line]
    again = [json.loads(line)["loss"] for line in (resumed / "metrics.jsonl").open()
             if '"train"' in line]
    assert losses == again  # the same batches, the same dropout masks

    # Resuming against another base: one line, nothing written.
    before = snapshot(resumed)
    assert train.main(argv(resumed, other, "--config.num_steps=6")) == 2
    one_error_line(capsys, "is another model")
    assert snapshot(resumed) == before
    # ... and a LoRA run is not resumed as a full one.
    assert train.main(argv(resumed, base, "--config.num_steps=6", "--config.lora.rank=0")) == 2
    one_error_line(capsys, "holds LoRA adapters")
    assert snapshot(resumed) == before


@pytest.mark.parametrize("extra,match", [
    (("--config.lora.rank=-1",), "lora.rank must be an integer >= 0"),
    (("--config.lora.targets=q,x",), "unknown: x"),
    (("--config.lora.alpha=0",), "lora.alpha must be > 0"),
    (("--config.lora.dropout=1.0",), "lora.dropout"),
    (("--config.lora.base_dtype=int3",), "lora.base_dtype must be one of"),
    (("--config.init_from=",), "set init_from"),
])
def test_bad_lora_input_is_one_line_and_writes_nothing(bases, tmp_path, capsys, extra, match):
    wd = tmp_path / "run"
    assert train.main(argv(wd, bases[0], "--config.num_steps=1", *extra)) == 2
    one_error_line(capsys, match)
    assert not wd.exists()


def test_a_4_bit_base_needs_whole_blocks(tmp_path, capsys):
    narrow = tiny_model_dir(tmp_path / "narrow", CFG.replace(hidden_size=32,
                                                             num_attention_heads=2))
    wd = tmp_path / "run"
    assert train.main(argv(wd, narrow, "--config.num_steps=1")) == 2
    one_error_line(capsys, "hidden_size=32 is not a multiple of the quantisation block (64)")
    assert not wd.exists()


def test_commands_take_a_lora_workdir_as_a_model(bases, tmp_path, capsys):
    wd = tmp_path / "run"
    assert train.main(argv(wd, bases[0], "--config.num_steps=2")) == 0
    capsys.readouterr()
    merged, _, _ = model_io.load_params(wd)
    assert not lora.has_adapters(merged)
    rc = generate.main(["--ckpt", str(wd), "--prompt", "abc", "--template", "none",
                        "--max-new-tokens", "4", "--exit-layer", "2"])
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "eval"
    rc = evaluate.main(["--ckpt", str(wd), "--data", "builtin", "--limit", "8", "--mesh",
                        "1,1,1", "--out", str(out), "--template", "plain", "--max-len", "48"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "exit_metrics.json").read_text())["checkpoints"][0]["exits"]
    assert sorted(int(e) for e in metrics) == [2, 3]
    ict_dir = tmp_path / "ict"
    rc = ict.main(["--ckpt", str(wd), "--data", "builtin", "--out", str(ict_dir), "--exits",
                   "2", "--num-steps", "2", "--batch-size", "8", "--template", "plain",
                   "--max-len", "48", "--mesh", "1,1,1"])
    assert rc == 0, capsys.readouterr().err
    trunk, _ = model_io.load_model_dir(ict_dir)  # the merged model is its frozen trunk
    np.testing.assert_array_equal(trunk["layers"]["mlp"]["up_proj"]["kernel"],
                                  merged["layers"]["mlp"]["up_proj"]["kernel"])
