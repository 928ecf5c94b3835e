"""`python -m sorted_jax.evaluate`: per-exit metrics equal SoftSteps.eval_step's (and a naive
recomputation), table/JSON/plots hold every exit, SFT+ICT dirs use their heads, latency,
generation dumps, TriviaQA EM, the pair helper, and clean errors for bad input."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import ASSETS, BYTE_4L, FAST, random_params

import sorted_jax.objective.heads as ict_heads
from sorted_jax import evaluate
from sorted_jax.data import (
    EvalIterator,
    builtin_records,
    open_split_records,
    tokenize_records,
)
from sorted_jax.data.tokenizers import ByteTokenizer, save_tokenizer_files
from sorted_jax.evaluation import evaluator
from sorted_jax.io import ict_dir, model_io, reports
from sorted_jax.model.layers import rms_norm
from sorted_jax.model.modeling import make_model
from sorted_jax.parallel.sharding import make_mesh
from sorted_jax.training.train_step import SoftSteps, to_global_batch

CFG = BYTE_4L
EXITS = (1, 2, 4)
LIMIT, BATCH, MAX_LEN = 20, 8, 48
COMMON = ["--data", "builtin", "--template", "plain", "--max-len", str(MAX_LEN),
          "--batch-size", str(BATCH), "--mesh", "1,1,1", "--limit", str(LIMIT)]


@pytest.fixture(autouse=True)
def fast_decoder(monkeypatch):
    """Decoders compile with XLA's cheap optimisation level (tiny models, CPU)."""
    import sorted_jax.decoding as dec

    monkeypatch.setattr(dec, "Decoder", functools.partial(dec.Decoder, compiler_options=FAST))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A model dir and an SFT+ICT dir whose heads equal the shared head."""
    root = tmp_path_factory.mktemp("evaluate")
    params = random_params(CFG, 1)
    model_io.save_model_dir(root / "model", params, CFG)
    save_tokenizer_files("builtin", root / "model")
    heads = ict_heads.init_heads(params, CFG, (1, 2, 4))
    ict_dir.save_ict_dir(root / "ict", params, CFG, heads, "builtin", {"template": "plain"})
    return root, params


@pytest.fixture(scope="module")
def two_ckpt_run(dirs):
    root, _ = dirs
    out = root / "out"
    rc = evaluate.main(["--ckpt", str(root / "model"), "--ckpt", str(root / "ict"),
                        "--label", "sft", "--label", "sft_ict", "--exits", "1,2,4",
                        "--out", str(out), *COMMON])
    assert rc == 0
    return out, json.loads((out / evaluator.METRICS_JSON).read_text())


def _eval_batches():
    records = builtin_records("eval")[:LIMIT]
    ds = tokenize_records(records, ByteTokenizer(), MAX_LEN, "plain")
    return ds, list(EvalIterator(ds, BATCH))


def test_metrics_equal_softsteps_eval_step(dirs, two_ckpt_run):
    _, params = dirs
    _, summary = two_ckpt_run
    ds, batches = _eval_batches()
    steps = SoftSteps(make_model(CFG), EXITS, optax.identity(), make_mesh((1, 1, 1),
                                                                          jax.devices()[:1]))
    total = None
    for local in batches:
        s = steps.eval_step(params, to_global_batch(local, steps.batch_shardings))
        total = s if total is None else total + s
    total = jax.device_get(total)
    sft = summary["checkpoints"][0]
    assert sft["label"] == "sft" and sft["examples"] == len(ds) == LIMIT
    assert sft["tokens"] == int(total.tokens)
    for i, e in enumerate(EXITS):
        got = sft["exits"][str(e)]
        loss = float(total.loss[i] / total.tokens)
        assert got["loss"] == pytest.approx(loss, rel=1e-6)
        assert got["accuracy"] == pytest.approx(float(total.correct[i] / total.tokens),
                                                rel=1e-6)
        assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)


def test_metrics_equal_naive_recomputation(dirs, two_ckpt_run):
    """Independently of soft.py: full logits per exit, masked mean CE and argmax hits."""
    _, params = dirs
    _, summary = two_ckpt_run
    model = make_model(CFG)
    _, batches = _eval_batches()

    @jax.jit
    def per_exit(batch):
        hidden = model.apply({"params": params}, batch["input_ids"],
                             attention_mask=batch["attention_mask"]).hidden
        x = rms_norm(hidden, params["norm"]["scale"], CFG.rms_norm_eps, jnp.float32)
        logits = x @ params["lm_head"]["kernel"]  # [L, B, T, V]
        logp = jax.nn.log_softmax(logits, -1)
        ce = -jnp.take_along_axis(logp, batch["targets"][None, ..., None], -1)[..., 0]
        hit = jnp.argmax(logits, -1) == batch["targets"][None]
        m = batch["loss_mask"][None]
        return (ce * m).sum((1, 2)), (hit * m).sum((1, 2)), m.sum()

    loss, hits, n = 0.0, 0.0, 0.0
    for b in batches:
        lo, hi, nn_ = per_exit({k: jnp.asarray(v) for k, v in b.items()})
        loss, hits, n = loss + np.asarray(lo), hits + np.asarray(hi), n + float(nn_)
    for ck in summary["checkpoints"]:  # the ICT dir's heads are copies of the shared head
        for e in EXITS:
            got = ck["exits"][str(e)]
            assert got["loss"] == pytest.approx(loss[e - 1] / n, rel=1e-4), (ck["label"], e)
            assert got["accuracy"] == pytest.approx(hits[e - 1] / n, rel=1e-4)
    assert summary["checkpoints"][1]["ict_heads"] is True


def test_table_json_and_plot_hold_every_exit(two_ckpt_run):
    out, summary = two_ckpt_run
    md = (out / evaluator.METRICS_MD).read_text()
    header = [x for x in md.splitlines() if x.startswith("| exit")][0]
    for col in ("sft loss", "sft ppl", "sft acc", "sft_ict loss", "sft_ict ppl", "sft_ict acc"):
        assert f" {col} |" in header
    rows = [x for x in md.splitlines() if x.startswith("| ") and not x.startswith("| exit")]
    assert [int(r.split("|")[1]) for r in rows] == list(EXITS)
    loss1 = summary["checkpoints"][0]["exits"]["1"]["loss"]
    assert f"{loss1:.4f}" in rows[0]
    for ck in summary["checkpoints"]:
        assert sorted(map(int, ck["exits"])) == list(EXITS)
    png = (out / evaluator.QUALITY_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not (out / evaluator.SPEED_PNG).exists()  # only with --latency


def test_table_leaves_missing_cells_blank():
    results = [{"label": "a", "exits": {2: {"loss": 1.0, "perplexity": 2.7, "accuracy": 0.5}}},
               {"label": "b", "exits": {4: {"loss": 2.0, "perplexity": 7.4, "accuracy": 0.25,
                                            "ms_per_token": 1.5}}}]
    md = reports.metrics_table(results)
    assert "| 2 | 1.0000 | 2.700 | 0.5000 | - | - | - | - |" in md
    assert "| 4 | - | - | - | 2.0000 | 7.400 | 0.2500 | 1.500 |" in md


def test_latency_generations_triviaqa_and_pairs(dirs, tmp_path):
    root, _ = dirs
    sample = ASSETS / "triviaqa_sample.json"
    if not sample.is_file():
        pytest.skip(f"{sample} not found")
    out, gens = tmp_path / "out", tmp_path / "gens.jsonl"
    tqa = json.loads(sample.read_text())  # the real record + one longer than the context
    tqa["Data"].append({"Question": "why? " * 40, "Answer": {"Value": "because"}})
    (tmp_path / "tqa.json").write_text(json.dumps(tqa))
    rc = evaluate.main(["--ckpt", str(root / "ict"), "--label", "m", "--exits", "2,4",
                        "--out", str(out), *COMMON, "--latency", "--latency-tokens", "4",
                        "--dump-generations", str(gens), "--num-generations", "3",
                        "--max-new-tokens", "4", "--gen-batch-size", "2",
                        "--triviaqa", str(tmp_path / "tqa.json"),
                        "--triviaqa-max-new-tokens", "4"])
    assert rc == 0
    summary = json.loads((out / evaluator.METRICS_JSON).read_text())
    ck = summary["checkpoints"][0]
    for e in ("2", "4"):
        assert ck["exits"][e]["ms_per_token"] > 0
        assert ck["exits"][e]["triviaqa_em"] in (0.0, 0.5)
        res = ck["triviaqa"][e]
        assert res["num_questions"] == 2 and res["skipped"] == 1
        preds = res["predictions"]
        assert preds[0]["question_id"] == "tc_33" and "skipped" not in preds[0]
        assert preds[1]["skipped"] and not preds[1]["correct"]
    assert "m ms/tok" in (out / evaluator.METRICS_MD).read_text()
    assert "m TQA EM" in (out / evaluator.METRICS_MD).read_text()
    assert (out / evaluator.SPEED_PNG).read_bytes()[:4] == b"\x89PNG"

    lines = [json.loads(x) for x in gens.read_text().splitlines()]
    assert len(lines) == 3 * 2
    records = builtin_records("eval")[:3]
    for x in lines:
        assert {"instruction", "input", "response", "label", "exit", "id"} <= set(x)
        assert x["instruction"] == records[x["id"]]["instruction"]
        assert x["input"] == records[x["id"]]["input"]
        assert x["label"] == "m" and x["exit"] in (2, 4) and x["ict_head"] is True
    # the dump holds what the decoder makes at that exit
    tok = ByteTokenizer()
    params, _ = model_io.load_model_dir(root / "model")
    from sorted_jax.data.templates import format_prompt
    from sorted_jax.decoding import Decoder

    r = records[0]
    prompt = [tok.bos_id, *tok.encode(format_prompt(r["instruction"], r["input"], "plain"))]
    toks = Decoder(params, CFG).generate([prompt], mode="fixed", exit_layer=2,
                                         max_new_tokens=4, eos_id=[tok.eos_id]).tokens[0]
    toks = toks[:-1] if toks and toks[-1] == tok.eos_id else toks
    first = next(x for x in lines if x["id"] == 0 and x["exit"] == 2)
    assert first["response"] == tok.decode(toks)

    pairs_file = tmp_path / "pairs.jsonl"
    rc = evaluate.main(["pair", "--gens", str(gens), "--a", "m:2", "--b", "m:4",
                        "--out", str(pairs_file)])
    assert rc == 0
    pairs = [json.loads(x) for x in pairs_file.read_text().splitlines()]
    assert len(pairs) == 3
    by = {(x["exit"], x["id"]): x["response"] for x in lines}
    for p in pairs:
        assert p["response1"] == by[(2, p["id"])] and p["response2"] == by[(4, p["id"])]
        assert p["instruction"] == records[p["id"]]["instruction"]


def test_pair_helper(tmp_path, capsys):
    rows = [
        {"id": 0, "label": "soft", "exit": 4, "instruction": "i0", "input": "", "response": "a"},
        {"id": 1, "label": "soft", "exit": 4, "instruction": "i1", "input": "x", "response": "b"},
        {"id": 0, "label": "sft", "exit": 8, "instruction": "i0", "input": "", "response": "c"},
        {"id": 1, "label": "sft", "exit": 8, "instruction": "i1", "input": "x", "response": "d"},
        {"id": 2, "label": "sft", "exit": 8, "instruction": "i2", "input": "", "response": "e"},
    ]
    gens = tmp_path / "g.jsonl"
    gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "p.jsonl"
    assert evaluate.main(["pair", "--gens", str(gens), "--a", "soft:4", "--b", "sft:8",
                          "--out", str(out)]) == 0
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    assert pairs == [
        {"id": 0, "instruction": "i0", "input": "", "response1": "a", "response2": "c",
         "model1": "soft:4", "model2": "sft:8"},
        {"id": 1, "instruction": "i1", "input": "x", "response1": "b", "response2": "d",
         "model1": "soft:4", "model2": "sft:8"},
    ]
    capsys.readouterr()
    # the destination: its own earlier output only with --overwrite; never its input or a
    # file it did not write (both left byte-identical)
    pair = ["pair", "--gens", str(gens), "--a", "soft:4", "--b", "sft:8", "--out"]
    before = out.read_bytes()
    out.write_text("")  # a file pair did not write
    assert evaluate.main([*pair, str(out), "--overwrite"]) == 2
    assert "is not an output of" in capsys.readouterr().err and out.read_text() == ""
    out.write_bytes(before)
    assert evaluate.main([*pair, str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert evaluate.main([*pair, str(out), "--overwrite"]) == 0 and out.read_bytes() == before
    gens_bytes = gens.read_bytes()
    assert evaluate.main([*pair, str(gens), "--overwrite"]) == 2
    assert "--out" in capsys.readouterr().err and gens.read_bytes() == gens_bytes
    out = tmp_path / "p2.jsonl"
    assert evaluate.main(["pair", "--gens", str(gens), "--a", "soft:6", "--b", "sft:8",
                          "--out", str(out)]) == 2
    assert "--a soft:6 is not in the generations (have: sft:8, soft:4)" in (
        capsys.readouterr().err)
    assert evaluate.main(["pair", "--gens", str(gens), "--a", "soft", "--b", "sft:8",
                          "--out", str(out)]) == 2
    assert "LABEL:EXIT" in capsys.readouterr().err
    gens.write_text('{"id": 0}\n')
    assert evaluate.main(["pair", "--gens", str(gens), "--a", "soft:4", "--b", "sft:8",
                          "--out", str(out)]) == 2
    assert "not a --dump-generations line" in capsys.readouterr().err


def _err(capsys, argv) -> str:
    capsys.readouterr()
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sorted_jax.evaluate: error: ") and "Traceback" not in err
    return err


def test_bad_inputs(dirs, tmp_path, capsys):
    root, _ = dirs
    model = str(root / "model")
    out = ["--out", str(tmp_path / "o")]
    err = _err(capsys, ["--ckpt", model, "--exits", "2,9", *COMMON, *out])
    assert "out of range" in err and "4 layers" in err and "[9]" in err
    err = _err(capsys, ["--ckpt", str(root / "ict"), "--exits", "3", *COMMON, *out])
    assert "heads for exits [1, 2, 4] only; no head for exits [3]" in err
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "params").mkdir()
    err = _err(capsys, ["--ckpt", str(tmp_path / "noconfig"), *COMMON, *out])
    assert "no config.json" in err
    err = _err(capsys, ["--ckpt", str(tmp_path / "missing"), *COMMON, *out])
    assert "does not exist" in err

    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"},\n {"prompt": "no fields"}]')
    args = ["--ckpt", model, "--template", "plain", "--mesh", "1,1,1", *out]
    err = _err(capsys, [*args, "--data", str(bad)])
    assert "bad.json:2: record 1" in err and "'instruction'" in err
    bad.write_text('{"Data": "not instruction records"}\n{"x": 1}')
    err = _err(capsys, [*args, "--data", str(bad)])
    assert "bad.json:1" in err
    err = _err(capsys, [*args, "--data", str(tmp_path / "nope.json")])
    assert "file not found" in err
    err = _err(capsys, [*args, "--data", "builtin", "--split", "test"])
    assert "split" in err
    err = _err(capsys, [*COMMON, "--ckpt", model, "--ckpt", model, "--label", "one", *out])
    assert "1 --label for 2 --ckpt" in err
    tq = tmp_path / "tq.json"
    tq.write_text('{"Data": [{"Question": "q"}]}')
    err = _err(capsys, [*COMMON, "--ckpt", model, "--triviaqa", str(tq), *out])
    assert "no 'Answer'" in err
    err = _err(capsys, [*COMMON, "--ckpt", model, "--max-len", "512", *out])
    assert "max_position_embeddings" in err


def test_bad_input_exits_cleanly_from_the_shell(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "sorted_jax.evaluate", "--ckpt", str(tmp_path / "empty"),
         "--data", "builtin", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "config.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_defaults_from_the_training_run(dirs, tmp_path):
    """A run's train_config.json supplies template, max_len, buckets and the exits to score."""
    import shutil

    root, _ = dirs
    d = tmp_path / "run"
    shutil.copytree(root / "model", d)
    cfg = {"exits": "last", "eval_exits": "1,3", "max_len": 40, "dtype": "float32",
           "batch_size": 16, "optim": {"lr": 0.003},
           "data": {"train": "data.json", "template": "plain", "seed": 3, "buckets": "40",
                    "eval_holdout": 2, "tokenizer": "builtin"}}
    (d / "train_config.json").write_text(json.dumps(cfg))
    ck = evaluator.load_checkpoint(d, "run", load_weights=False)
    assert ck.params is None and not ck.is_ict
    assert ck.default_exits() == (1, 3)
    s = ck.settings
    assert (s.template, s.max_len, s.buckets, s.eval_holdout, s.data_seed,
            s.lr) == ("plain", 40, [40], 2, 3, 0.003)
    cfg["eval_exits"] = ""  # an SFT run without eval exits: the SoFT default set
    (d / "train_config.json").write_text(json.dumps(cfg))
    ck = evaluator.load_checkpoint(d, "run", load_weights=False)
    assert ck.default_exits() == (1, 2, 3, 4)  # soft.default_exits(4)
    ict_ck = evaluator.load_checkpoint(root / "ict", "i", load_weights=False)
    assert ict_ck.default_exits() == (1, 2, 4) and ict_ck.settings.template == "plain"

    # a JSON file with a held-out part: eval = the records training held out, train = the rest
    data = tmp_path / "data.json"
    recs = [{"instruction": f"i{i}", "input": "", "output": f"o{i}"} for i in range(6)]
    data.write_text(json.dumps(recs))
    held = open_split_records(str(data), "eval", holdout=2, seed=3)
    rest = open_split_records(str(data), "train", holdout=2, seed=3)
    assert len(held) == 2 and len(rest) == 4
    assert sorted(r["instruction"] for r in held + rest) == sorted(r["instruction"] for r in recs)
    assert open_split_records(str(data), "eval") == recs
