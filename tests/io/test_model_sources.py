"""Any HF LLaMA dir works wherever a model is read (`init_from`, `--ckpt` of generate, evaluate,
ict and serve) and gives exactly what converting it first gives; the HF dir is never written
to (every file hashed before and after). Bad HF dirs end in one clear line.

The HF dir is a real `transformers.LlamaForCausalLM` (random, fp32) saved with
`save_pretrained`, with a SentencePiece tokenizer (tok512.model) beside it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import ASSETS, FAST, TINY_CONFIG_FILE, last_axis_shardings

from sorted_jax import convert, evaluate, generate, ict, train
from sorted_jax.data.tokenizers import save_tokenizer_files
from sorted_jax.io import artifacts, model_io
from sorted_jax.io.param_tree import flatten
from sorted_jax.model.config import LlamaConfig
from sorted_jax.training import metrics_log

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

CFG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2)


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` (files by sha256, dirs by name): what 'untouched' means."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(autouse=True)
def fast_decoder(monkeypatch):
    """Decoders compile with XLA's cheap optimisation level (tiny models, CPU)."""
    import sorted_jax.decoding as dec

    monkeypatch.setattr(dec, "Decoder", functools.partial(dec.Decoder, compiler_options=FAST))
    monkeypatch.setattr(generate, "Decoder", functools.partial(dec.Decoder,
                                                               compiler_options=FAST))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(root, HF dir, its snapshot, the converted model dir)."""
    from conftest import make_hf_llama

    root = tmp_path_factory.mktemp("sources")
    hf = root / "hf"
    make_hf_llama(CFG, seed=3).save_pretrained(hf)
    save_tokenizer_files(ASSETS / "tok512.model", hf)  # tokenizer.model + tokenizer_config.json
    before = snapshot(hf)
    assert convert.main(["hf-to-orbax", "--hf", str(hf), "--out", str(root / "converted"),
                         "--no-progress"]) == 0
    assert snapshot(hf) == before
    return root, hf, before, root / "converted"


def run_ok(main, argv, capsys) -> str:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def fails(main, argv, prog: str, match: str, capsys) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    assert match in err, err
    return err


def test_hf_dir_loads_as_its_conversion(sources):
    _, hf, before, converted = sources
    assert model_io.model_kind(hf) == model_io.HF_DIR
    art = artifacts.inspect(hf)
    assert art.kind == artifacts.HF_DIR and art.tokenizer_dir == hf and not art.is_ict
    assert art.config == model_io.load_config(converted) == CFG
    ours, conv = art.load_params(), model_io.load_params(converted)[0]
    fo, fc = flatten(ours), flatten(conv)
    assert fo.keys() == fc.keys()
    for k in fo:
        assert fo[k].dtype == fc[k].dtype == np.float32
        np.testing.assert_array_equal(fo[k], fc[k], err_msg="/".join(k))
    tok = art.tokenizer()
    assert tok.encode("Hello world") == artifacts.inspect(converted).tokenizer().encode(
        "Hello world")
    with pytest.raises(model_io.ModelIOError, match="training workdirs only"):
        model_io.load_params(hf, step=3)
    assert snapshot(hf) == before




def test_sharded_load_places_one_leaf_at_a_time(sources):
    """With shardings the weights land in their shards; the host never holds the model: numpy's
    traced peak, beyond what stays allocated (on CPU the device buffers are host memory too),
    stays near one leaf, one tensor and the shard copies in flight: under 3.5x the largest
    leaf, where a load that first builds the whole model on the host needs 6.5x."""
    _, hf, before, converted = sources
    ref = model_io.load_params(converted)[0]
    shardings = last_axis_shardings(ref)
    leaf_bytes = [x.nbytes for x in flatten(ref).values()]
    tracemalloc.start()
    try:
        placed, config, _ = model_io.load_params(hf, shardings=shardings)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert config == CFG
    emb = placed["embed_tokens"]["embedding"]
    assert emb.sharding == shardings["embed_tokens"]["embedding"]
    assert len({str(s.index) for s in emb.addressable_shards}) == 8  # really split
    for path, want in flatten(ref).items():
        got = flatten(placed)[path]
        assert isinstance(got, jax.Array)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg="/".join(path))
    assert sum(leaf_bytes) > 6 * max(leaf_bytes)
    assert peak - kept < 3.5 * max(leaf_bytes), (peak, kept, max(leaf_bytes), sum(leaf_bytes))
    assert snapshot(hf) == before


def test_generate_from_hf_dir_equals_converted(sources, capsys):
    _, hf, before, converted = sources
    outs = []
    for ckpt in (hf, converted):
        outs.append(run_ok(generate.main, ["--ckpt", ckpt, "--prompt", "Once upon a time",
                                           "--max-new-tokens", "12"], capsys))
    assert outs[0] == outs[1] and outs[0].strip()
    assert snapshot(hf) == before


def test_evaluate_hf_dir_equals_converted(sources, capsys):
    root, hf, before, converted = sources
    common = ["--data", "builtin", "--template", "plain", "--max-len", "48", "--batch-size",
              "8", "--mesh", "1,1,1", "--limit", "16", "--exits", "2,4"]
    summaries = []
    for name, ckpt in (("e_hf", hf), ("e_conv", converted)):
        run_ok(evaluate.main, ["--ckpt", ckpt, "--out", root / name, *common], capsys)
        summary = json.loads((root / name / "exit_metrics.json").read_text())
        summaries.append(summary["checkpoints"][0]["exits"])
    assert summaries[0] == summaries[1] and set(summaries[0]) == {"2", "4"}
    assert snapshot(hf) == before


def _train_argv(workdir: Path, init_from: Path) -> list[str]:
    return ["train", f"--config={TINY_CONFIG_FILE}", f"--workdir={workdir}",
            f"--config.init_from={init_from}", "--config.data.tokenizer=",
            "--config.model.preset=", "--config.model.vocab_size=0", "--config.exits=2,4",
            "--config.eval_exits=",
            "--config.num_steps=2", "--config.log_every=1", "--config.batch_size=8",
            "--config.eval_batches=1", "--config.eval_at_start=False",
            "--config.data.max_records=64", "--config.max_len=64", "--config.data.buckets=",
            "--config.mesh.shape=1,4,2"]


def test_init_from_hf_dir_trains_as_converted(sources, capsys):
    """A short run from the HF dir (sharded on a 4x2 fsdp x tensor mesh) logs the same losses
    and ends with the same weights as one from its conversion; its tokenizer comes along."""
    root, hf, before, converted = sources
    rows, finals = [], []
    for name, src in (("t_hf", hf), ("t_conv", converted)):
        wd = root / name
        assert train.main(_train_argv(wd, src)) == 0, capsys.readouterr().err
        rows.append([(r["step"], r["loss"]) for r in metrics_log.read_metrics(wd, "train")])
        finals.append(flatten(model_io.load_params(wd)[0]))
        assert (wd / "tokenizer" / "tokenizer.model").read_bytes() == (
            hf / "tokenizer.model").read_bytes()
    assert rows[0] == rows[1] and [s for s, _ in rows[0]] == [1, 2]
    for k in finals[0]:
        np.testing.assert_array_equal(finals[0][k], finals[1][k], err_msg="/".join(k))
    assert snapshot(hf) == before


def test_ict_from_hf_dir_equals_converted(sources, capsys):
    root, hf, before, converted = sources
    heads = []
    for name, ckpt in (("i_hf", hf), ("i_conv", converted)):
        out = root / name
        run_ok(ict.main, ["--ckpt", ckpt, "--data", "builtin", "--exits", "2", "--num-steps", "2",
                          "--batch-size", "2", "--max-len", "128", "--template", "plain",
                          "--mesh", "1,1,1",
                          "--out", out], capsys)
        heads.append(flatten(model_io.restore_params(out / "ict_heads")))
        assert (out / "tokenizer.model").is_file()
    for k in heads[0]:
        np.testing.assert_array_equal(heads[0][k], heads[1][k], err_msg="/".join(k))
    assert snapshot(hf) == before


def test_serve_loads_hf_dir(sources):
    """What serve does with --ckpt before it listens (inspect, tokenizer, weights in the
    compute dtype) gives the converted dir's tokenizer and weights."""
    _, hf, before, converted = sources
    got = []
    for ckpt in (hf, converted):
        art = artifacts.inspect(ckpt)
        tok = art.tokenizer(None)
        got.append((art.config, tok.encode("The cat sat"), tok.eos_id,
                    flatten(art.load_params(dtype=np.float32))))
    assert got[0][:3] == got[1][:3]
    for k in got[0][3]:
        np.testing.assert_array_equal(got[0][3][k], got[1][3][k])
    assert snapshot(hf) == before


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as res:
        return json.loads(res.read())


def test_serve_process_on_hf_dir(sources, tmp_path, capsys):
    """A real `python -m sorted_jax.serve --ckpt HF_DIR` on 127.0.0.1: its greedy completion
    is generate's on the converted dir."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    _, hf, before, converted = sources
    want = run_ok(generate.main, ["--ckpt", converted, "--prompt", "The cat",
                                  "--max-new-tokens", "8"], capsys)
    port = _free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sorted_jax.serve", "--ckpt", str(hf),
                                 "--port", str(port), "--fast-compile"], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).read()
                break
            except OSError:
                time.sleep(0.3)
        res = _post(f"{url}/completions", {"model": "model", "prompt": "The cat",
                                           "temperature": 0, "max_tokens": 8})
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    text = res["choices"][0]["text"]
    assert text == want.rstrip("\n") and text
    assert snapshot(hf) == before


# ---------------------------------------------------------------------------------------------
# bad HF dirs: one line each, before anything heavy


def test_hf_dir_without_weights(sources, tmp_path, capsys):
    _, hf, _, _ = sources
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        (bare / f).write_bytes((hf / f).read_bytes())
    err = fails(generate.main, ["--ckpt", bare, "--prompt", "hi"], "sorted_jax.generate",
                "its weights are missing", capsys)
    assert "model.safetensors" in err
    fails(evaluate.main, ["--ckpt", bare, "--data", "builtin", "--out", tmp_path / "o"],
          "sorted_jax.evaluate", "its weights are missing", capsys)
    # (the run's config resolves from config.json alone, as --plan does; the weights fail)
    fails(train.main, _train_argv(tmp_path / "run", bare), "sorted_jax.train",
          "its weights are missing", capsys)
    assert model_io.workdir_steps(tmp_path / "run") == []


def test_hf_dir_of_another_architecture(sources, tmp_path, capsys):
    _, hf, _, _ = sources
    other = tmp_path / "gpt2"
    other.mkdir()
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes())
    msg = "holds an HF 'gpt2' model"
    fails(generate.main, ["--ckpt", other, "--prompt", "hi"], "sorted_jax.generate", msg,
          capsys)
    fails(convert.main, ["hf-to-orbax", "--hf", other, "--out", tmp_path / "md"],
          "sorted_jax.convert hf-to-orbax", msg, capsys)
    fails(train.main, _train_argv(tmp_path / "run", other), "sorted_jax.train", msg, capsys)


def test_a_file_that_is_not_a_gguf(tmp_path, capsys):
    f = tmp_path / "model.bin"
    f.write_bytes(b"PK\x03\x04 not a model")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert generate.main(["--ckpt", str(f), "--prompt", "hi"]) == 2
    assert "is a file but not a GGUF file" in err.getvalue()
    assert err.getvalue().count("\n") == 1
