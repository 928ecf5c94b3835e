"""The training CLI, in-process: outputs of a short run, config validation, init_from, NaN stop.

These run with the 8 fake CPU devices of conftest.py (mesh (8, 1, 1), one row per device).
Subprocess tests (SIGTERM + resume, two processes) are in test_train_resume.py.
"""

from __future__ import annotations

import json

import chex
import jax
import numpy as np
import pytest
from helpers import TINY_CONFIG_FILE, TRAIN_SMALL, TRAIN_SMALL_CONFIG

from sorted_jax import train
from sorted_jax.core.errors import TrainConfigError
from sorted_jax.data import save_tokenizer_files
from sorted_jax.io import model_io
from sorted_jax.model.modeling import init_params, make_model
from sorted_jax.training import checkpoint, metrics_log
from sorted_jax.training.run_spec import parse_args
from sorted_jax.training.trainer import Trainer

TINY = str(TINY_CONFIG_FILE)
SMALL = TRAIN_SMALL
SMALL_CONFIG = TRAIN_SMALL_CONFIG


def argv(workdir, *extra):
    return ["train", f"--config={TINY}", f"--workdir={workdir}", *SMALL, *extra]


def small_config(*extra):
    config, _ = parse_args(argv("unused", *extra))
    return config


def test_cli_run_writes_everything(tmp_path, capsys):
    wd = tmp_path / "run"
    rc = train.main(argv(wd, "--config.num_steps=6", "--config.log_every=2",
                         "--config.eval_every=3", "--config.checkpoint_every=2",
                         "--config.keep_checkpoints=2"))
    out = capsys.readouterr()
    assert rc == 0, out.err
    # checkpoints: keep-2 of steps 2, 4, 6, readable by model_io
    assert model_io.workdir_steps(wd) == [4, 6]
    params, config, _ = model_io.load_params(wd)
    assert config == SMALL_CONFIG
    chex.assert_shape(params["layers"]["mlp"]["up_proj"]["kernel"], (2, 32, 64))
    ckpt = checkpoint.Checkpointer(wd)
    meta = ckpt.read_meta(6)
    ckpt.close()
    assert meta["exits"] == [1, 2] and meta["step"] == 6
    assert meta["train_config"]["batch_size"] == 8
    assert meta["model_config"]["num_hidden_layers"] == 2
    data_state = json.loads((wd / "checkpoints" / "6" / "data" / "metadata").read_text())
    assert data_state["index"] == 6 * 8 and data_state["epoch"] == 0
    # metrics.jsonl: train lines every 2 steps, eval at 3 and 6, per-exit keys
    train_rows = metrics_log.read_metrics(wd, "train")
    eval_rows = metrics_log.read_metrics(wd, "eval")
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert [r["step"] for r in eval_rows] == [3, 6]
    for row in train_rows + eval_rows:
        assert {"loss/exit_1", "loss/exit_2", "accuracy/exit_1", "accuracy/exit_2"} <= set(row)
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_rows)
    # TensorBoard events, plot, table, final metrics, model config, tokenizer
    assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
    assert (wd / "exit_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (wd / "exit_table.md").read_text()
    assert "| 1/2 |" in table and "| 2/2 |" in table and table in out.out
    final = json.loads((wd / "final_metrics.json").read_text())
    assert final["step"] == 6 and final["interrupted"] is None
    assert final["eval"]["loss/exit_2"] == pytest.approx(eval_rows[-1]["loss/exit_2"])
    assert (wd / "tokenizer" / "sorted_jax_tokenizer.json").is_file()
    assert json.loads((wd / "train_config.json").read_text())["exits"] == "1,2"


@pytest.mark.parametrize("extra, message", [
    (["--config.exits=0,2"], r"exit layers \[0\] are out of range: exits are layer numbers 1..2"),
    (["--config.exits=1,3"], r"exit layers \[3\] are out of range"),
    (["--config.exits="], r"exits is empty"),
    (["--config.eval_exits=5"], r"exit layers \[5\] are out of range"),
    (["--config.optim.lrr=1"], r"unknown config key 'config.optim.lrr'\. Did you mean "
                               r"'config.optim.lr'\?"),
    (["--config.nope=1"], r"unknown config key 'config.nope'"),
    (["--config.mesh.shape=3,1,1"], r"needs 3 devices, but 8 are available"),
    (["--config.batch_size=12"], r"micro-batch size 12 .* not divisible by the data-parallel "
                                 r"size 8"),
    (["--config.batch_size=16", "--config.grad_accum=3"], r"not divisible by grad_accum=3"),
    (["--config.data.train=/no/such/alpaca.json"], r"data.train='/no/such/alpaca.json': data "
                                                   r"file not found"),
    (["--config.model.vocab_size=200"], r"has 264 ids but the model's vocab_size is 200"),
    (["--config.remat_policy=some"], r"remat_policy must be one of"),
    (["--config.model.preset=llama9"], r"unknown model.preset 'llama9'"),
    (["--config.max_len=4096"], r"max_len=4096 exceeds the model's max_position_embeddings"),
])
def test_bad_config_fails_before_compiling(tmp_path, capsys, monkeypatch, extra, message):
    def no_compile(*args, **kwargs):
        raise AssertionError("validation should have failed before building the train step")

    monkeypatch.setattr("sorted_jax.training.trainer.SoftSteps", no_compile)
    wd = tmp_path / "run"
    assert train.main(argv(wd, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("sorted_jax.train: error: ")
    assert err.count("\n") == 1  # one line, no traceback
    import re

    assert re.search(message, err), err
    assert not (wd / "checkpoints").exists()


def test_url_paths_are_refused_not_written_locally(tmp_path, capsys, monkeypatch):
    """pathlib would make 'gs://b/run' a local './gs:/b/run': refuse it, naming the fix."""
    monkeypatch.chdir(tmp_path)
    assert train.main(argv("gs://bkt/run")) == 2
    err = capsys.readouterr().err
    assert "--workdir='gs://bkt/run': gs:// URLs are not supported" in err and "gcsfuse" in err
    assert train.main(argv(tmp_path / "run", "--config.init_from=gs://bkt/base")) == 2
    assert "init_from='gs://bkt/base': gs:// URLs are not supported" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere


def test_malformed_record_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text('[\n  {"instruction": "a", "input": "", "output": "b"},\n'
                    '  {"instruction": "c", "input": ""}\n]\n')
    assert train.main(argv(tmp_path / "run", f"--config.data.train={data}")) == 2
    err = capsys.readouterr().err
    assert f"{data}:3: record 1: record has no 'output' field" in err, err


def test_init_from_model_dir_loads_weights(tmp_path):
    model = make_model(SMALL_CONFIG)
    params = jax.tree.map(np.asarray, init_params(model, jax.random.PRNGKey(7)))
    model_dir = tmp_path / "base"
    model_io.save_model_dir(model_dir, params, SMALL_CONFIG)
    save_tokenizer_files("builtin", model_dir)

    # init_from with the tokenizer taken from the model dir and the architecture from it too
    from_model_dir = (f"--config.init_from={model_dir}", "--config.data.tokenizer=",
                      "--config.model.preset=", "--config.model.vocab_size=0",
                      "--config.model.hidden_size=0", "--config.model.intermediate_size=0",
                      "--config.model.num_hidden_layers=0",
                      "--config.model.num_attention_heads=0",
                      "--config.model.num_key_value_heads=0", "--config.num_steps=2")
    config = small_config(*from_model_dir)
    trainer = Trainer(config, tmp_path / "run")
    assert trainer.model_config == SMALL_CONFIG
    assert trainer.start_step == 0 and int(trainer.state.step) == 0
    loaded = jax.tree.map(np.asarray, trainer.state.params)
    chex.assert_trees_all_equal(loaded, params)
    trainer.checkpointer.close()

    # on an fsdp x tensor mesh the weights are read straight into their shards
    sharded = Trainer(small_config(*from_model_dir, "--config.mesh.shape=1,4,2"),
                            tmp_path / "run_fsdp")
    emb = sharded.state.params["embed_tokens"]["embedding"]
    assert emb.sharding.spec == sharded.steps.params_shardings["embed_tokens"]["embedding"].spec
    assert len({str(s.index) for s in emb.addressable_shards}) > 1  # really split
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, sharded.state.params), params)
    sharded.checkpointer.close()

    # an explicit preset must agree with the weights
    config = small_config(f"--config.init_from={model_dir}", "--config.model.hidden_size=64",
                          "--config.model.intermediate_size=128")
    with pytest.raises(TrainConfigError, match=r"does not match model.preset='tiny'.*"
                                                     r"hidden_size: 64 vs 32"):
        Trainer(config, tmp_path / "run2")


def test_non_finite_stop_names_the_quantity_and_a_healthy_checkpoint(tmp_path, capsys):
    """Issue 17, defect 5: at lr 1e4 the loss stays finite while the gradient norm at step 2's
    weights is NaN. The stop names the gradient norm, marks step 2 diverged (its weights'
    gradient is NaN) and names as last good only a step whose own loss and gradient norm
    were finite."""
    wd = tmp_path / "run"
    rc = train.main(argv(wd, "--config.num_steps=8", "--config.checkpoint_every=1",
                         "--config.log_every=1", "--config.optim.lr=1e4",
                         "--config.optim.clip_norm=0", "--config.optim.b2=0.0"))
    err = capsys.readouterr().err
    assert rc == 1, err
    import re

    from sorted_jax.training import checkpoint_integrity as integrity

    m = re.search(r"(the loss|the gradient norm|the loss and the gradient norm) became "
                  r"non-finite at step (\d+) \(loss=(\S+), grad_norm=(\S+), .* The last good "
                  r"checkpoint is step (\d+)", err)
    assert m, err
    what, bad, loss, gnorm, good = m.groups()
    named = {"the loss": (True, False), "the gradient norm": (False, True),
             "the loss and the gradient norm": (True, True)}[what]
    assert named == (not np.isfinite(float(loss.rstrip(","))), not np.isfinite(float(gnorm)))
    bad, good = int(bad), int(good)
    assert integrity.health(wd, good) == integrity.GOOD
    assert integrity.health(wd, bad - 1) == integrity.DIVERGED
    assert all(integrity.health(wd, s) != integrity.GOOD
               for s in model_io.workdir_steps(wd) if s > good)
    params, _, _ = model_io.load_params(wd, step=good)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    # a plain re-run passes over the diverged step and says so
    assert train.main(argv(wd, "--config.num_steps=8", "--config.checkpoint_every=1",
                           "--config.log_every=1", "--config.optim.lr=1e4",
                           "--config.optim.clip_norm=0", "--config.optim.b2=0.0")) == 1
    out = capsys.readouterr().out
    assert f"step {bad - 1} in" in out and f"resuming from step {good}" in out, out
