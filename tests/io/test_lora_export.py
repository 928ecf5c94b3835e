"""A LoRA run's exports against the real libraries: `--peft` read by `peft.PeftModel` on the HF
base the run started from gives our logits, the merged (depth-k) export read by transformers
gives our exit k, and every command loads the run's workdir as the merged model."""

from __future__ import annotations

import contextlib
import io
import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_llama
from helpers import REPO, random_params, tiny_workdir

from sorted_jax import train
from sorted_jax.convert import main as convert
from sorted_jax.data.tokenizers import save_tokenizer_files
from sorted_jax.io import artifacts, model_io
from sorted_jax.model import lora
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.exits import exit_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CFG = LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
TARGETS = "q,k,v,o,gate,up,down"


def train_lora(workdir, base, *extra):
    argv = ["train", f"--config={REPO / 'configs' / 'tiny.py'}", f"--workdir={workdir}",
            f"--config.init_from={base}", "--config.model.preset=", "--config.model.vocab_size=0",
            "--config.data.tokenizer=", "--config.exits=2,3", "--config.eval_exits=",
            "--config.batch_size=8", "--config.eval_batches=1", "--config.max_len=48",
            "--config.data.buckets=48", "--config.data.max_records=64", "--config.num_steps=3",
            "--config.checkpoint_every=3", "--config.eval_every=0", "--config.log_every=1",
            "--config.optim.lr=3e-2", "--config.optim.warmup_steps=0",
            "--config.dtype=float32", "--config.attention_impl=xla",
            "--config.async_checkpointing=False", "--config.tensorboard=False",
            "--config.lora.rank=4", "--config.lora.alpha=12", f"--config.lora.targets={TARGETS}",
            "--config.lora.base_dtype=float32", *extra]
    assert train.main(argv) == 0
    return workdir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """An HF base dir (a real LlamaForCausalLM, the builtin tokenizer) and a LoRA run on it."""
    root = tmp_path_factory.mktemp("lora_export")
    hf = root / "hf_base"
    make_hf_llama(CFG, seed=3).save_pretrained(hf)
    save_tokenizer_files("builtin", hf)
    return hf, train_lora(root / "run", hf)


def ids(seed=0):
    return np.random.default_rng(seed).integers(3, CFG.vocab_size, (2, 11)).astype(np.int32)


def hf_logits(model, x):
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.long)).logits.float().numpy()


def run_convert(*argv):
    assert convert([str(a) for a in argv]) == 0


def test_the_workdir_loads_as_the_merged_model(lora_run):
    hf, wd = lora_run
    merged, config, step = model_io.load_workdir_params(wd)
    assert step == 3 and config == CFG and not lora.has_adapters(merged)
    trained, _, _ = model_io.load_workdir_params(wd, merge_lora=False)
    assert lora.has_adapters(trained) and "embed_tokens" not in trained  # adapters only
    base, _, _ = model_io.load_params(hf)
    spec = lora.LoraSpec(rank=4, alpha=12, base_dtype="float32")
    want = lora.merge(base, trained, spec)
    for path, x in lora._flat(want):
        np.testing.assert_array_equal(lora._get(merged, path), x)
    q = ("layers", "self_attn", "q_proj", "kernel")
    assert not np.array_equal(lora._get(merged, q), lora._get(base, q))  # trained
    art = artifacts.inspect(wd)  # what generate / serve / evaluate / ict read
    assert art.kind == artifacts.WORKDIR and art.config == CFG
    np.testing.assert_array_equal(art.load_params()["layers"]["mlp"]["down_proj"]["kernel"],
                                  merged["layers"]["mlp"]["down_proj"]["kernel"])


def test_peft_export_is_our_model_under_the_peft_library(lora_run, tmp_path):
    hf, wd = lora_run
    out = tmp_path / "adapter"
    run_convert("orbax-to-hf", "--ckpt", wd, "--out", out, "--peft", "--no-progress")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 12.0)
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    base = transformers.LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(base, out).eval()
    assert model.peft_config["default"].r == 4
    merged, _, _ = model_io.load_workdir_params(wd)
    x = ids()
    ours = np.asarray(exit_logits(jnp_tree(merged), CFG, x))
    ref = hf_logits(model, x)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    with model.disable_adapter():  # the adapters matter: without them it is the base
        plain = hf_logits(model, x)
    assert np.abs(plain - ref).max() > 1e-3


def test_merged_depth_k_export_is_our_exit_k(lora_run, tmp_path):
    _, wd = lora_run
    merged, _, _ = model_io.load_workdir_params(wd)
    x = ids(1)
    for k in (2, 3):
        out = tmp_path / f"depth{k}"
        run_convert("orbax-to-hf", "--ckpt", wd, "--out", out, "--exit-layer", k,
                    "--no-progress")
        model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert model.config.num_hidden_layers == k
        ours = np.asarray(exit_logits(jnp_tree(merged), CFG, x, k))
        ref = hf_logits(model, x)
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def fails(*argv, match):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = convert([str(a) for a in argv])
    msg = err.getvalue()
    assert rc == 2 and msg.startswith("sorted_jax.convert orbax-to-hf: error: "), msg
    assert msg.count("\n") == 1 and match in msg, msg


def test_peft_export_of_a_full_run_or_a_depth_is_refused(lora_run, tmp_path):
    full = tiny_workdir(tmp_path / "full", CFG, {1: random_params(CFG)})
    out = tmp_path / "out"
    fails("orbax-to-hf", "--ckpt", full, "--out", out, "--peft", match="not a LoRA run")
    fails("orbax-to-hf", "--ckpt", lora_run[0], "--out", out, "--peft",
          match="not a training workdir")
    fails("orbax-to-hf", "--ckpt", lora_run[1], "--out", out, "--peft", "--exit-layer", "2",
          match="--exit-layer")
    assert not out.exists()


def jnp_tree(tree):
    return {k: jnp_tree(v) if isinstance(v, dict) else jnp.asarray(v) for k, v in tree.items()}
