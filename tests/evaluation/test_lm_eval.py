"""`evaluate lm-eval`: lm-evaluation-harness tasks per exit.

The scorer's numbers are the model's own forward pass at each exit (early exit's per-position
rule, speculative = the full model), without the harness. With the harness (`lm_eval`, the
`lm-eval` extra): on local JSON tasks (multiple choice, generation, rolling loglikelihood),
`evaluate lm-eval --exits k` gives the numbers of the harness's own `hf` model run on the
depth-k HF export of the same weights: accuracy and exact match exactly, every generation
string, every log-prob to 1e-4. Bad input ends in one clear line.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ASSETS, BYTE_4L, random_params

from sorted_jax import convert, decoding, evaluate
from sorted_jax.data.tokenizers import ByteTokenizer, save_tokenizer_files
from sorted_jax.evaluation.lm_eval_model import ExitLM, length_bucket
from sorted_jax.io.model_io import save_model_dir
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.modeling import Llama, make_model

# A 4-layer model on the 512-piece SentencePiece tokenizer: HF's AutoTokenizer loads the files
# `save_tokenizer_files` writes with the same ids (and BOS) as ours.
TOK512_4L = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
TASKS = ["tiny_mc", "tiny_gen", "tiny_ppl"]


# ---------------------------------------------------------------------------------------------
# the scorer and generator alone (no harness)


def _reference_logprobs(params, config, rows):
    """log-softmax [N, L, T, V] of each row at every exit (layer 1..L): the model's own forward
    pass with all exits, rows right-padded to one length (causal: padding changes nothing
    before it), no mask."""
    model = make_model(config)
    ids = np.zeros((len(rows), 48), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r

    @jax.jit
    def run(p, x):
        out = model.apply({"params": p}, x, exits=None)
        return jax.nn.log_softmax(model.apply({"params": p}, out.hidden, method=Llama.head))

    return np.asarray(run(params, jnp.asarray(ids))).transpose(1, 0, 2, 3)


def _requests(n, seed=0):
    rng = np.random.default_rng(seed)
    return [([1, *rng.integers(3, 259, int(rng.integers(1, 40))).tolist()],
             rng.integers(3, 259, int(rng.integers(1, 6))).tolist()) for _ in range(n)]


def _expected(lp, ctx, cont):
    """(sum of log p(cont), all argmax) from a [T, V] log-prob table of ctx + cont."""
    whole = [*ctx, *cont]
    rows = range(len(ctx) - 1, len(whole) - 1)
    total = sum(float(lp[t, whole[t + 1]]) for t in rows)
    greedy = all(int(np.argmax(lp[t])) == whole[t + 1] for t in rows)
    return total, greedy


@pytest.fixture(scope="module")
def byte_model():
    return random_params(BYTE_4L, seed=3, as_jax=True), BYTE_4L


def test_scores_are_the_exits_own_forward_pass(byte_model):
    params, config = byte_model
    reqs = _requests(7)
    ref = _reference_logprobs(params, config, [c + x for c, x in reqs])
    for k in (1, 2, 4):
        # batch 3: two full batches and a short one, rows of different lengths in a batch
        got = ExitLM(params, config, ByteTokenizer(), exit_layer=k,
                     batch_size=3).loglikelihood_tokens(reqs)
        for (ctx, cont), lps, (total, greedy) in zip(reqs, ref, got, strict=True):
            want = _expected(lps[k - 1], ctx, cont)
            assert total == pytest.approx(want[0], abs=1e-4), (k, ctx, cont)
            assert greedy == want[1]
    # a continuation that is the exit's own argmax is greedy
    ctx = reqs[0][0]
    best = int(np.argmax(ref[0][1][len(ctx) - 1]))
    (_, greedy), = ExitLM(params, config, ByteTokenizer(), exit_layer=2).loglikelihood_tokens(
        [(ctx, [best])])
    assert greedy
    # the context is left-truncated to the model's context window, as the hf model does
    long_ctx = [1, *([65] * 200)]
    (t_long, _), = ExitLM(params, config, ByteTokenizer(), exit_layer=4).loglikelihood_tokens(
        [(long_ctx, [66, 67])])
    (t_cut, _), = ExitLM(params, config, ByteTokenizer(), exit_layer=4).loglikelihood_tokens(
        [(long_ctx[-127:], [66, 67])])
    assert t_long == pytest.approx(t_cut, abs=1e-5)
    assert [length_bucket(n, 128) for n in (1, 32, 33, 64, 65, 127)] == [32, 32, 64, 64, 128,
                                                                         128]


def test_early_exit_scores_take_the_first_confident_exit(byte_model):
    params, config = byte_model
    reqs = _requests(5, seed=1)
    exits = (1, 2, 4)

    def scores(thresholds):
        return ExitLM(params, config, ByteTokenizer(), mode="early-exit", exits=exits,
                      thresholds=thresholds, batch_size=2).loglikelihood_tokens(reqs)

    first = ExitLM(params, config, ByteTokenizer(), exit_layer=1).loglikelihood_tokens(reqs)
    last = ExitLM(params, config, ByteTokenizer(), exit_layer=4).loglikelihood_tokens(reqs)
    assert np.allclose([s for s, _ in scores((0.0, 0.0))], [s for s, _ in first], atol=1e-5)
    assert np.allclose([s for s, _ in scores((1.01, 1.01))], [s for s, _ in last], atol=1e-5)
    # in between: per position, the first exit whose top-1 probability reaches its threshold
    lps = [lp[[e - 1 for e in exits]] for lp in
           _reference_logprobs(params, config, [c + x for c, x in reqs])]
    conf = [np.exp(lp.max(-1))[:, len(c) - 1:-1] for lp, (c, _) in zip(lps, reqs, strict=True)]
    th = tuple(float(np.median(np.concatenate([c[j] for c in conf]))) for j in (0, 1))
    picked = set()
    for (ctx, cont), lp, (total, greedy) in zip(reqs, lps, scores(th), strict=True):
        c = np.exp(lp.max(-1))  # [K, T]
        pick = np.where(c[0] >= th[0], 0, np.where(c[1] >= th[1], 1, 2))
        picked |= set(pick[len(ctx) - 1:-1].tolist())
        want = _expected(lp[pick, np.arange(lp.shape[1])], ctx, cont)
        assert total == pytest.approx(want[0], abs=1e-4)
        assert greedy == want[1]
    assert picked == {0, 1, 2}  # the thresholds send positions to every exit
    # speculative decoding's distribution is the full model's, whatever the draft depth
    spec = ExitLM(params, config, ByteTokenizer(), mode="speculative",
                  draft_layer=1).loglikelihood_tokens(reqs)
    assert np.allclose([s for s, _ in spec], [s for s, _ in last], atol=1e-5)


def test_generate_is_the_decoders_output_cut_early_at_a_stop_string(byte_model):
    params, config = byte_model
    tok = ByteTokenizer()
    prompts = [[1, *tok.encode(t)] for t in ("Hello", "The colour of the sky", "x")]
    dec = decoding.Decoder(params, config)
    want = dec.generate(prompts, mode="fixed", exit_layer=2, max_new_tokens=24, eos_id=2)
    texts = [tok.decode([t for t in row if t != 2]) for row in want.tokens]
    lm = ExitLM(params, config, tok, exit_layer=2, batch_size=2, max_gen_toks=24)
    assert lm.generate(prompts) == texts
    assert lm.stats.tokens > 0
    # a stop string stops its row at once: the text ends with it (or just past it)
    stop = texts[1][5:7]
    got = lm.generate(prompts, until=[stop])
    assert stop in got[1] and texts[1].startswith(got[1])
    assert len(got[1]) < len(texts[1])
    assert got[0] == texts[0] or stop in got[0]
    # speculative greedy generation is the full model's
    full = ExitLM(params, config, tok, exit_layer=4, max_gen_toks=24).generate(prompts)
    spec = ExitLM(params, config, tok, mode="speculative", draft_layer=2, batch_size=3,
                  max_gen_toks=24)
    assert spec.generate(prompts) == full
    assert spec.stats.drafted > 0


# ---------------------------------------------------------------------------------------------
# against the harness's own hf model

def _write_tasks(d: Path) -> None:
    rng = random.Random(0)
    words = "red green blue cat dog sun moon tree river stone bird fish house road".split()
    mc = [{"question": " ".join(rng.choices(words, k=5)), "choices": rng.sample(words, 4),
           "answer": rng.randrange(4)} for _ in range(20)]
    gen = [{"question": " ".join(rng.choices(words, k=6)), "answer": rng.choice(words)}
           for _ in range(10)]
    (d / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in mc))
    (d / "gen.jsonl").write_text("".join(json.dumps(x) + "\n" for x in gen))
    common = "dataset_path: json\ntest_split: test\n"

    def data(name):
        return f"dataset_kwargs:\n  data_files:\n    test: {d / name}\n"

    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + data("mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    (d / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + data("gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    (d / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + common + data("gen.jsonl")
        + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        'doc_to_target: "{{question}} {{answer}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")


def _hf(hf_dir: Path, tasks_dir: Path, tasks=TASKS) -> dict:
    """The harness's own `hf` model (transformers + torch) on an HF dir."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=list(tasks),
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        batch_size=5, device="cpu", log_samples=True)


def _ours(column_dir: Path) -> dict:
    out = json.loads((column_dir / "results.json").read_text())
    out["samples"] = {t: [json.loads(x) for x in (column_dir / f"samples_{t}.jsonl")
                          .read_text().splitlines()] for t in TASKS
                      if (column_dir / f"samples_{t}.jsonl").is_file()}
    return out


def _by_doc(res: dict, task: str, key: str) -> dict:
    return {s["doc_id"]: s[key] for s in res["samples"][task]}


def _assert_same(ours: dict, hf: dict, tasks=TASKS) -> None:
    for task in tasks:
        o, h = ours["results"][task], hf["results"][task]
        if task == "tiny_mc":
            assert o["acc,none"] == h["acc,none"]
            assert o["acc_norm,none"] == h["acc_norm,none"]
            lo, lh = _by_doc(ours, task, "resps"), _by_doc(hf, task, "resps")
            assert lo.keys() == lh.keys() and len(lo) == 20
            for doc in lo:  # [[(log p, is greedy)] per choice]
                for (a,), (b,) in zip(lo[doc], lh[doc], strict=True):
                    assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
        elif task == "tiny_gen":
            assert o["exact_match,none"] == h["exact_match,none"]
            go, gh = _by_doc(ours, task, "filtered_resps"), _by_doc(hf, task, "filtered_resps")
            assert go == gh
            assert sum(bool(g[0]) for g in go.values()) >= 5  # real text, not empty strings
        else:
            for m in ("word_perplexity,none", "bits_per_byte,none"):
                assert o[m] == pytest.approx(h[m], rel=1e-5)


@pytest.fixture(scope="module")
def harness_setup(tmp_path_factory):
    """A random 4-layer model dir (tok512), its depth-2 and depth-4 HF exports, and local
    tasks whose generation targets half match the depth-2 model's greedy answers."""
    pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("lm_eval")
    model = root / "model"
    save_model_dir(model, random_params(TOK512_4L, seed=0), TOK512_4L)
    save_tokenizer_files(ASSETS / "tok512.model", model)
    tasks = root / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    hf = {}
    for k in (2, 4):
        hf[k] = root / f"hf{k}"
        assert convert.main(["orbax-to-hf", "--ckpt", str(model), "--out", str(hf[k]),
                             "--exit-layer", str(k), "--no-progress"]) == 0
    # exact match must be able to fail: every other target is the depth-2 model's own answer
    answers = _by_doc(_hf(hf[2], tasks, ["tiny_gen"]), "tiny_gen", "filtered_resps")
    rows = [json.loads(x) for x in (tasks / "gen.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        if i % 2 == 0:
            r["answer"] = answers[i][0]
    (tasks / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, tasks, hf


@pytest.mark.slow
def test_per_exit_numbers_equal_the_hf_model_on_the_depth_k_export(harness_setup, tmp_path,
                                                                   capsys):
    model, tasks, hf = harness_setup
    out = tmp_path / "out"
    rc = evaluate.main(["lm-eval", "--ckpt", str(model), "--exits", "2,4", "--tasks",
                        ",".join(TASKS), "--include-path", str(tasks), "--batch-size", "3",
                        "--out", str(out), "--log-samples"])
    assert rc == 0
    for k in (2, 4):
        ref = _hf(hf[k], tasks)
        _assert_same(_ours(out / f"exit_{k}"), ref)
        if k == 2:
            assert ref["results"]["tiny_gen"]["exact_match,none"] >= 0.5
    # one table, task x exit, with the harness's stderr; the harness's JSON per exit
    table = (out / "lm_eval_table.md").read_text()
    assert "| task | metric | filter | exit_2 | exit_4 |" in table
    assert "| tiny_mc | acc | none |" in table and " ± " in table
    own = json.loads((out / "exit_4" / "results.json").read_text())
    assert {"results", "versions", "n-shot", "configs", "config"} <= own.keys()
    assert own["config"]["model_name"].endswith(":exit_4")
    summary = json.loads((out / "lm_eval_summary.json").read_text())
    assert list(summary["columns"]) == ["exit_2", "exit_4"]
    assert summary["columns"]["exit_2"]["decoding"]["layers"] == 2
    assert "exit_4" in capsys.readouterr().out


@pytest.mark.slow
def test_speculative_columns_give_the_full_models_numbers(harness_setup, tmp_path):
    model, tasks, hf = harness_setup
    out = tmp_path / "spec"
    rc = evaluate.main(["lm-eval", "--ckpt", str(model), "--exits", "1,2", "--mode",
                        "speculative", "--tasks", "tiny_mc,tiny_gen", "--include-path",
                        str(tasks), "--out", str(out), "--log-samples"])
    assert rc == 0
    full = _hf(hf[4], tasks, ["tiny_mc", "tiny_gen"])
    for k in (1, 2):
        _assert_same(_ours(out / f"spec_draft_{k}"), full, ["tiny_mc", "tiny_gen"])
        stats = json.loads((out / "lm_eval_summary.json").read_text())["columns"][
            f"spec_draft_{k}"]["decoding"]
        assert stats["draft_layer"] == k and stats["drafted"] > 0
        assert 0 <= stats["acceptance_rate"] <= 1


# ---------------------------------------------------------------------------------------------
# bad input: one line each


def _error(capsys, argv):
    rc = evaluate.main(["lm-eval", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("sorted_jax.evaluate lm-eval: error: ")
    return err[0]


def test_bad_input_ends_in_one_line(harness_setup, tmp_path, capsys, monkeypatch):
    model, tasks, _ = harness_setup
    out = tmp_path / "o"
    base = ["--ckpt", str(model), "--include-path", str(tasks), "--out", str(out)]
    msg = _error(capsys, [*base, "--exits", "2,9", "--tasks", "tiny_mc"])
    assert "--exits 2,9" in msg and "[9] are out of range" in msg and "1..4" in msg
    msg = _error(capsys, [*base, "--exits", "4", "--mode", "speculative", "--tasks", "tiny_mc"])
    assert "draft_layer must be an integer in 1..3" in msg
    msg = _error(capsys, [*base, "--exits", "2", "--tasks", "tiny_mc,tiny_mcq"])
    assert "unknown task 'tiny_mcq'" in msg and "close matches: tiny_mc" in msg
    assert not out.exists()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    msg = _error(capsys, [*base, "--exits", "2", "--tasks", "tiny_mc"])
    assert 'pip install -e ".[lm-eval]"' in msg
    assert not out.exists()
