"""Trunk-preserving SoFT through the train command: anchored runs and exit adapters."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import TINY_CONFIG_FILE, TRAIN_SMALL

from sorted_jax import train
from sorted_jax.io import model_io
from sorted_jax.model.exit_adapters import trunk_params
from sorted_jax.training import metrics_log


def argv(workdir, *extra):
    return ["train", f"--config={TINY_CONFIG_FILE}", f"--workdir={workdir}", *TRAIN_SMALL,
            "--config.checkpoint_every=0", *extra]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A short SFT run: the base every test here starts from."""
    wd = tmp_path_factory.mktemp("sft") / "run"
    assert train.main(argv(wd, "--config.num_steps=4", "--config.exits=last")) == 0
    return wd


def _rows(wd):
    return [r for r in metrics_log.read_metrics(wd) if r.get("split") == "train"]


def test_anchored_run_starts_at_zero_kl_to_its_base_and_moves_away(sft, tmp_path):
    wd = tmp_path / "anchored"
    rc = train.main(argv(wd, f"--config.init_from={sft}", "--config.num_steps=4",
                         "--config.log_every=1", "--config.anchor_weight=2.0"))
    assert rc == 0
    kl = [r["kl_to_teacher/exit_2"] for r in _rows(wd)]
    # step 1 is computed at the base's own weights: the student is its teacher
    assert kl[0] == pytest.approx(0.0, abs=1e-5)
    assert kl[-1] > 1e-5  # then the weights move and the KL is really computed
    assert all("kl_to_teacher/exit_1" in r for r in _rows(wd))


def test_exit_adapters_train_only_the_adapters(sft, tmp_path):
    wd = tmp_path / "adapters"
    rc = train.main(argv(wd, f"--config.init_from={sft}", "--config.num_steps=3",
                         "--config.log_every=1", "--config.exit_adapters=layer",
                         "--config.distill_weight=0.5", "--config.eval_at_start=True"))
    assert rc == 0
    base, _, _ = model_io.load_params(sft)
    got, config, _ = model_io.load_params(wd)
    assert config.exit_adapters == (1,)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(trunk_params(base)),
                            jax.tree.leaves(trunk_params(got)), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
    # the adapter started as a copy of layer 2 and has moved
    start = np.asarray(base["layers"]["mlp"]["up_proj"]["kernel"][1])
    assert not np.array_equal(np.asarray(got["exit_adapters"]["mlp"]["up_proj"]["kernel"][0]),
                              start)
    evals = [r for r in metrics_log.read_metrics(wd) if r.get("split") == "eval"]
    # the last exit is the frozen trunk's: its held-out loss does not move at all
    assert evals[0]["loss/exit_2"] == evals[-1]["loss/exit_2"]
    assert evals[-1]["loss/exit_1"] < evals[0]["loss/exit_1"]  # the adapter learns


@pytest.mark.parametrize("extra,match", [
    (["--config.anchor_weight=1.0"], "init_from is empty"),
    (["--config.anchor_weight=-1"], "anchor_weight must be >= 0"),
    (["--config.anchor_weight=1.0", "--config.anchor_teacher=/no/such/dir"], "does not exist"),
    (["--config.exit_adapters=layer"], "set init_from to the trunk"),
    (["--config.exit_adapters=mlp"], "exit_adapters must be one of"),
    (["--config.exit_adapter_init=first"], "exit_adapter_init must be one of"),
])
def test_bad_trunk_preserving_settings_are_one_line(tmp_path, capsys, extra, match):
    assert train.main(argv(tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_exit_adapters_need_an_exit_below_the_last(sft, tmp_path, capsys):
    rc = train.main(argv(tmp_path / "run", f"--config.init_from={sft}",
                         "--config.exit_adapters=layer", "--config.exits=last"))
    assert rc == 2
    assert "needs exits below the last layer" in capsys.readouterr().err
