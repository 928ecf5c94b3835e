"""An exported SoFT model is what HF's self-speculative decoding expects.

`convert orbax-to-hf` writes a plain `LlamaForCausalLM`; `generate(..., assistant_early_exit=k)`
drafts with its first k layers + the shared final norm and head: our exit k. Its draft logits
are our exit k's, its greedy output is HF's plain greedy output (and ours, self-speculative
or not), and `bench/hf_early_exit.py` reports the acceptance of both.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import BYTE_4L_W64, FAST, REPO, random_params

from sorted_jax import convert
from sorted_jax.data.tokenizers import save_tokenizer_files
from sorted_jax.decoding import Decoder
from sorted_jax.io.model_io import save_model_dir
from sorted_jax.model.modeling import Llama, make_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch's pool spins against the other processes of a 2-core machine: 1 thread is ~10x
    faster for a model this small."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("hf_ee")
    params = random_params(BYTE_4L_W64, seed=5, std=0.1)
    save_model_dir(root / "model", params, BYTE_4L_W64)
    save_tokenizer_files("builtin", root / "model")
    assert convert.main(["orbax-to-hf", "--ckpt", str(root / "model"), "--out",
                         str(root / "hf"), "--no-progress"]) == 0
    model = transformers.LlamaForCausalLM.from_pretrained(root / "hf",
                                                          dtype=torch.float32).eval()
    return root, params, model


def _prompts():
    rng = np.random.default_rng(0)
    return [[1, *rng.integers(3, 259, n).tolist()] for n in (5, 17, 30)]


def test_hf_early_exit_drafts_with_our_exit(exported):
    _, params, model = exported
    ids = _prompts()[1]
    ours = make_model(BYTE_4L_W64)
    base = model.model
    for k in (1, 2, 3):
        out = ours.apply({"params": params}, jnp.asarray([ids]), exits=(k,))
        want = np.asarray(ours.apply({"params": params}, out.hidden[-1], method=Llama.head))
        base.config.num_hidden_layers = k  # what HF's EarlyExitCandidateGenerator does
        try:
            with torch.no_grad():
                got = model(torch.tensor([ids])).logits.numpy()
        finally:
            base.config.num_hidden_layers = BYTE_4L_W64.num_hidden_layers
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_assistant_early_exit_gives_plain_greedy_output(exported):
    _, params, model = exported
    dec = Decoder(params, BYTE_4L_W64, compiler_options=FAST, pad_multiple=32)  # one shape
    n = 24
    for p in _prompts():
        with torch.no_grad():
            plain = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert len(plain) == n
        for k in (1, 2, 3):
            with torch.no_grad():
                assisted = model.generate(torch.tensor([p]), max_new_tokens=n,
                                          do_sample=False, eos_token_id=None, pad_token_id=0,
                                          assistant_early_exit=k)[0, len(p):].tolist()
            assert assisted == plain, (k, p)
            ours = dec.generate([p], mode="speculative", draft_layer=k, max_new_tokens=n,
                                eos_id=())
            assert ours.tokens[0] == plain, (k, p)
        assert dec.generate([p], max_new_tokens=n, eos_id=()).tokens[0] == plain


@pytest.mark.slow
def test_bench_reports_acceptance_of_both(exported):
    root, _, _ = exported
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hf_early_exit.py"), "--ckpt",
         str(root / "model"), "--draft-layer", "2", "--prompts", "2", "--new-tokens", "8",
         "--repeats", "1"], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1]
            for line in res.stdout.splitlines() if line.startswith("| ")}
    for name in ("hf greedy", "hf early-exit", "hf early-exit, our policy", "ours greedy",
                 "ours speculative"):
        tokens_per_s, acceptance, _, same = (c.strip() for c in rows[name])
        assert float(tokens_per_s) > 0
        assert same.endswith(": 2/2")  # the same tokens as its own greedy output
        if "early-exit" in name or "speculative" in name:
            rate, counts = acceptance.split(" ")
            accepted, drafted = map(int, counts.strip("()").split("/"))
            assert drafted > 0 and float(rate) == pytest.approx(accepted / drafted, abs=1e-3)
    assert "ours greedy == hf greedy on 2/2 prompts" in res.stdout
