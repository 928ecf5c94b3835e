"""`python -m sorted_jax.sweep` on a tiny budget: real child commands, table, JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sorted_jax import sweep
from sorted_jax.evaluation.sweep import PARETO_PNG, TABLE_JSON, TABLE_MD, summarise, table

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
              "model.num_attention_heads=2", "model.num_key_value_heads=1"]


def test_sweep_on_a_tiny_budget_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["--config", str(REPO / "configs" / "tiny_finetune.py"), "--out", str(out),
            "--pretrain-config", str(REPO / "configs" / "tiny_pretrain.py"),
            "--seeds", "1", "--recipe", "uniform", "--recipe", "w=exit_weights=last:0.7",
            "--recipe", "anchor", "--recipe", "adapters", "--eval-limit", "16",
            *[x for s in ("num_steps=2", "eval_exits=1,2", "eval_batches=1", "eval_every=0",
                          "data.max_records=64", "batch_size=8", "tensorboard=False",
                          "eval_at_start=False") for x in ("--set", s)],
            "--set", "exits=1,2", "--ict-steps", "1",
            *[x for s in TINY_MODEL for x in ("--pretrain-set", s)]]
    assert sweep.main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / TABLE_JSON).read_text())
    assert summary["exits"] == [1, 2] and summary["seeds"] == [1]
    assert set(summary["rows"]) == {"sft", "sft+ict", "uniform", "w", "anchor", "adapters"}
    # every number comes from evaluate's own output, checked independently here
    ev = json.loads((out / "eval" / "seed1" / "exit_metrics.json").read_text())
    assert {row["label"] for row in ev["checkpoints"]} == set(summary["rows"])
    for row in ev["checkpoints"]:
        got = summary["rows"][row["label"]]["per_seed"]["1"]
        assert {int(e): v["loss"] for e, v in row["exits"].items()} == pytest.approx(
            {int(e): v for e, v in got.items()})
    rows = summary["rows"]
    w, sft = rows["w"]["per_seed"]["1"]["2"], rows["sft"]["per_seed"]["1"]["2"]
    assert summary["rows"]["w"]["last_vs_sft"][0] == pytest.approx(w / sft - 1)
    # the recipe's override reached its run, and the runs started from the pretrained weights
    settings = json.loads((out / "runs" / "seed1" / "w" / "train_config.json").read_text())
    assert settings["exit_weights"] == "last:0.7" and settings["seed"] == 1
    assert settings["init_from"] == str(out / "pretrain")
    anchor = json.loads((out / "runs" / "seed1" / "anchor" / "train_config.json").read_text())
    assert anchor["anchor_weight"] == 1.0 and anchor["init_from"] == str(out / "pretrain")
    # the adapters start from this seed's SFT run, whose last exit they leave exactly as it is
    adapters = json.loads((out / "runs" / "seed1" / "adapters" / "train_config.json").read_text())
    assert adapters["init_from"] == str(out / "runs" / "seed1" / "sft")
    assert adapters["exit_adapters"] == "layer" and adapters["exits"] == "1,2"
    sft = json.loads((out / "runs" / "seed1" / "sft" / "train_config.json").read_text())
    assert sft["exits"] == "last" and sft["eval_exits"] == "1,2"
    assert rows["adapters"]["per_seed"]["1"]["2"] == rows["sft"]["per_seed"]["1"]["2"]
    md = (out / TABLE_MD).read_text()
    assert "| w |" in md and "| sft+ict |" in md and "last vs SFT" in md
    assert (out / PARETO_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second call reuses every finished run (no child command is started again)
    logs = {p: p.stat().st_mtime for p in (out / "logs").iterdir()}
    assert sweep.main(argv) == 0
    assert {p: p.stat().st_mtime for p in (out / "logs").iterdir()} == logs


def test_bad_recipes_are_clear_errors(tmp_path, capsys):
    base = ["--config", str(REPO / "configs" / "tiny_finetune.py"), "--out", str(tmp_path)]
    for recipe, match in [("nope", "unknown recipe"), ("a=b", "key=value"),
                          ("sft", "not 'sft'"), ("x y=z", "letters, digits")]:
        assert sweep.main([*base, "--recipe", recipe]) == 2
        assert match in capsys.readouterr().err
    assert sweep.main([*base, "--seeds", "a"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was written
    # OUT is never a dir the sweep did not write: checked before any run starts
    (tmp_path / "notes.txt").write_text("mine")
    assert sweep.main([*base, "--recipe", "uniform"]) == 2
    assert "is not an output of sorted_jax.sweep" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_summary_over_seeds():
    per_seed = {0: {"sft": {1: 3.0, 2: 2.0}, "r": {1: 2.0, 2: 2.2}},
                2: {"sft": {1: 3.2, 2: 2.0}, "r": {1: 2.4, 2: 2.4}}}
    s = summarise(per_seed)
    assert s["exits"] == [1, 2] and s["seeds"] == [0, 2]
    r = s["rows"]["r"]
    assert r["loss"][2] == pytest.approx((2.3, 0.1414213), rel=1e-5)
    assert r["mean_intermediate"] == pytest.approx((2.2, 0.2828427), rel=1e-5)
    assert r["last_vs_sft"] == pytest.approx((0.15, 0.0707107), rel=1e-5)
    assert s["rows"]["sft"]["last_vs_sft"] == pytest.approx((0.0, 0.0))
    md = table(s, {"r": "a recipe"})
    assert ("| r | 2.2000 +- 0.2828 | 2.3000 +- 0.1414 | +15.00% +- 7.07 | 2.2000 | a recipe |"
            in md)
