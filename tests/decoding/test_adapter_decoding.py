"""Decoding with exit adapters: every mode reads an exit's logits through its adapter layer.

References are plain models: the depth-k sub-model with its adapter is a (k + 1)-layer LLaMA
(`exit_adapters.submodel_params`), recomputed without a cache at every step, and HF's own
`generate` on that model.
"""

from __future__ import annotations

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FAST, GQA_4L

from sorted_jax.decoding import Decoder
from sorted_jax.model import exit_adapters
from sorted_jax.model.modeling import make_model

CFG = GQA_4L.replace(exit_adapters=(1, 2))
MAX_NEW, MAX_LEN, REF_T = 10, 32, 24


@pytest.fixture(scope="module")
def params():
    return helpers.random_params(CFG, 4, std=0.08, as_jax=True)


@pytest.fixture(scope="module")
def prompts():
    return [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13, 14, 15], [1, 3]]


def decoder(params, **kw) -> Decoder:
    kw.setdefault("max_draft", 5)
    return Decoder(params, CFG, compiler_options=FAST, **kw)


def _exit_fn(params, depth):
    """logits(ids [B, T], mask, last [B]) of the plain depth-k (+ adapter) model at `last`."""
    sub, cfg = exit_adapters.submodel_params(params, CFG, depth)
    model = make_model(cfg)

    @jax.jit
    def f(ids, mask, last):
        h = model.apply({"params": sub}, ids, attention_mask=mask,
                        exits=(cfg.num_hidden_layers,)).hidden[0]
        h = jnp.take_along_axis(h, last[:, None, None], axis=1)
        return model.apply({"params": sub}, h, method="head")[:, 0]

    return f


def reference(params, prompts, exits, thresholds=(), eos=2):
    """Greedy by recomputation: each token from the first exit (through its adapter) whose
    top-1 probability passes its threshold; the last exit always accepts."""
    fns = [_exit_fn(params, e) for e in exits]
    seqs, outs = [list(p) for p in prompts], [[] for _ in prompts]
    done, layers, confs = [False] * len(prompts), [], []
    for _ in range(MAX_NEW):
        ids = np.zeros((len(seqs), REF_T), np.int32)
        mask = np.zeros((len(seqs), REF_T), bool)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = s, True
        last = np.asarray([len(s) - 1 for s in seqs], np.int32)
        logits = [np.asarray(f(ids, mask, last)) for f in fns]
        for i in range(len(seqs)):
            if done[i]:
                continue
            for j in range(len(exits)):
                p = np.exp(logits[j][i] - logits[j][i].max())
                p /= p.sum()
                if j < len(exits) - 1:
                    confs.append((j, float(p.max())))
                if j == len(exits) - 1 or p.max() >= thresholds[j]:
                    break
            tok = int(np.argmax(logits[j][i]))
            layers.append(exits[j])
            outs[i].append(tok)
            seqs[i].append(tok)
            done[i] = tok == eos
    return outs, layers, confs


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_fixed_depth_reads_the_exit_through_its_adapter(params, prompts, depth):
    got = decoder(params).generate(prompts, mode="fixed", exit_layer=depth,
                                   max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    assert got.tokens == reference(params, prompts, [depth])[0]
    if depth in CFG.exit_adapters:  # the adapter matters: the bare exit decodes differently
        plain = Decoder(exit_adapters.trunk_params(params), CFG.replace(exit_adapters=()),
                        compiler_options=FAST).generate(
            prompts, mode="fixed", exit_layer=depth, max_new_tokens=MAX_NEW, max_len=MAX_LEN)
        assert plain.tokens != got.tokens


def test_adapter_submodel_equals_hf_generate_of_its_export(params, prompts, tmp_path):
    """`export_hf(..., exit_layer=k)` writes exit k with its adapter as a plain k+1-layer HF
    model; HF's own greedy `generate` on that dir equals our fixed-depth decoding."""
    torch = pytest.importorskip("torch")
    import transformers

    from sorted_jax.io.hf_export import export_hf

    depth = 2
    out = export_hf(jax.tree.map(np.asarray, params), CFG, tmp_path / "exit2", exit_layer=depth,
                    progress=False)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == depth + 1
    ours = decoder(params).generate(prompts, mode="fixed", exit_layer=depth,
                                    max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    for p, t in zip(prompts, ours.tokens, strict=True):
        with torch.no_grad():
            got = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=int),
                              max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2,
                              pad_token_id=0)
        assert got[0, len(p):].tolist() == t
    # The full depth exports the trunk alone: the adapters are not part of the full model.
    full = export_hf(jax.tree.map(np.asarray, params), CFG, tmp_path / "full", progress=False)
    assert transformers.AutoConfig.from_pretrained(full).num_hidden_layers == 4


@pytest.mark.parametrize("draft,batch", [(1, 3), (2, 1), (2, 8)])
def test_speculative_with_an_adapter_draft_equals_full_greedy(params, draft, batch):
    rng = np.random.default_rng(draft * 10 + batch)
    prompts = [[1] + rng.integers(3, 96, rng.integers(1, 8)).tolist() for _ in range(8)]
    dec = decoder(params)
    drafted = 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        full = dec.generate(chunk, max_new_tokens=MAX_NEW, max_len=MAX_LEN)
        spec = dec.generate(chunk, mode="speculative", draft_layer=draft,
                            max_new_tokens=MAX_NEW, max_len=MAX_LEN)
        assert spec.tokens == full.tokens, i
        drafted += spec.stats.drafted
    assert drafted > 0


def test_early_exit_through_adapters_is_exact(params, prompts):
    exits = [1, 2, 4]
    _, _, seen = reference(params, prompts, exits, thresholds=[2.0, 2.0])

    def between(j, q):
        c = np.unique([c for jj, c in seen if jj == j])
        i = int(q * (len(c) - 1))
        return float((c[i] + c[i + 1]) / 2)

    dec = decoder(params, ee_chunk=2, ee_min_saving=0.0)  # every token checked: the paper's rule
    used = set()
    for qa, qb in ((0.5, 0.5), (0.7, 0.3)):
        th = [between(0, qa), between(1, qb)]
        ref, layers, _ = reference(params, prompts, exits, thresholds=th)
        got = dec.generate(prompts, mode="early-exit", exits=exits, thresholds=th,
                           max_new_tokens=MAX_NEW, max_len=MAX_LEN)
        assert got.tokens == ref, th
        used |= set(layers)
    assert used == set(exits)
    first = dec.generate(prompts, mode="early-exit", exits=exits, thresholds=[0.0, 0.0],
                         max_new_tokens=MAX_NEW, max_len=MAX_LEN)
    assert first.tokens == reference(params, prompts, [1])[0]
