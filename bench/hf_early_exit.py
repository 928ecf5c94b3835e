"""HF's self-speculative decoding (`assistant_early_exit=k`) vs ours, on the same SoFT model.

    python bench/hf_early_exit.py --ckpt /tmp/h8/tiny --draft-layer 4
    python bench/hf_early_exit.py --ckpt RUN --draft-layer 4 --prompts 16 --new-tokens 48

The checkpoint (model dir or training workdir) is exported with `convert orbax-to-hf` (the full
model, into a temp dir) and loaded by transformers as a plain `LlamaForCausalLM`: HF's early
exit runs the first k layers + the shared final norm and head as the draft, which is exactly
a SoFT sub-model. Without `--ckpt` a random 8-layer model is used (acceptance then says
little).

Every method decodes the same prompts greedily, one prompt at a time (HF's assisted decoding
takes batch 1 only), on the CPU, in float32, and makes exactly `--new-tokens` tokens (EOS does
not stop either side, so both time the same number of tokens):

    hf greedy          model.generate(ids, do_sample=False)
    hf early-exit      + assistant_early_exit=k, HF's defaults (up to 20 drafts a round, the
                       draft stops below an adaptive confidence of 0.4)
    hf early-exit, our policy   + num_assistant_tokens=4, schedule heuristic_transient (+2 when
                       every draft is accepted, else -1), no confidence cut: our window's rule
    ours greedy        Decoder.generate(mode="fixed") (the full model)
    ours speculative   Decoder.generate(mode="speculative", draft_layer=k): window 4, +2 / -1,
                       at most --max-draft (8) drafts a round

tokens/s = generated tokens / wall time of the generate calls (prefill included), the best of
`--repeats` passes over all prompts after a warm-up pass (JAX's compilation excluded; HF
compiles nothing). acceptance = accepted drafts / drafted tokens; tokens/pass = generated
tokens / full-model passes (verify rounds + prefill). Every speculative output is checked
against its own greedy output (they must be equal), and ours against HF's.
Threads: `--threads` (default 1) for both: torch.set_num_threads and XLA's CPU flags
(`--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=N`, set before JAX starts).
One thread each is the fair setting on a shared 2-core machine: a tiny model gains nothing from
more, and torch's pool loses 10-30x when another process holds a core.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from sorted_jax.data import open_split_records
from sorted_jax.decoding import Decoder
from sorted_jax.evaluation.per_exit import prompt_ids
from sorted_jax.io import artifacts
from sorted_jax.io.conversion import orbax_to_hf
from sorted_jax.io.model_io import save_model_dir
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.modeling import abstract_params, make_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="model dir or training workdir (default: a random model)")
    p.add_argument("--draft-layer", type=int, help="k (default: half the layers)")
    p.add_argument("--prompts", type=int, default=16, help="prompts (held-out builtin records)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-draft", type=int, default=8, help="our decoder's largest window")
    p.add_argument("--template", help="prompt template (default: the run's, else plain)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of torch and of XLA")
    return p.parse_args(argv)


def random_ckpt(path: Path) -> Path:
    from sorted_jax.data.tokenizers import save_tokenizer_files

    cfg = LlamaConfig(vocab_size=264, hidden_size=128, intermediate_size=344,
                      num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    rng = np.random.default_rng(0)
    shapes = nn.unbox(abstract_params(make_model(cfg)))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.ones(x.shape, np.float32) if "scale" in jax.tree_util.keystr(path)
        else (0.05 * rng.standard_normal(x.shape)).astype(np.float32), shapes)
    save_model_dir(path, params, cfg)
    save_tokenizer_files("builtin", path)
    return path


@contextlib.contextmanager
def count_hf_drafts():
    """Drafted / accepted tokens and rounds of HF's early-exit candidate generator."""
    from transformers.generation import candidate_generator as cg

    cls = cg.EarlyExitCandidateGenerator
    counts = {"drafted": 0, "accepted": 0, "rounds": 0}
    get, update = cls.get_candidates, cls.update_candidate_strategy

    def get_candidates(self, input_ids, **kw):
        ids, logits = get(self, input_ids, **kw)
        counts["drafted"] += ids.shape[-1] - input_ids.shape[-1]
        return ids, logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        counts["accepted"] += int(num_matches)
        counts["rounds"] += 1
        return update(self, input_ids, scores, num_matches)

    cls.get_candidates, cls.update_candidate_strategy = get_candidates, update_candidate_strategy
    try:
        yield counts
    finally:
        cls.get_candidates, cls.update_candidate_strategy = get, update


def timed_passes(run, prompts, repeats):
    """(outputs of the last pass, best wall seconds of a pass) after one warm-up pass."""
    outs = [run(p) for p in prompts]  # warm-up: compiles every prompt-length bucket
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [run(p) for p in prompts]
        best = min(best, time.perf_counter() - t0)
    return outs, best


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                               f"{str(args.threads > 1).lower()} "
                               f"intra_op_parallelism_threads={args.threads}")
    import torch
    import transformers

    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="hf_early_exit_"))
    ckpt = Path(args.ckpt) if args.ckpt else random_ckpt(tmp / "random")
    art = artifacts.inspect(ckpt)
    cfg = art.config
    k = args.draft_layer or cfg.num_hidden_layers // 2
    tok = art.tokenizer()
    template = args.template or art.settings.template or "plain"
    records = open_split_records("builtin", "eval", limit=args.prompts)
    prompts = [prompt_ids(tok, r, template) for r in records]
    n = args.new_tokens
    hf_dir = orbax_to_hf(ckpt, tmp / "hf", progress=False)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # exactly n tokens, as ours
    model.generation_config.pad_token_id = 0
    print(f"model: {ckpt} ({cfg.num_hidden_layers} layers, width {cfg.hidden_size}, vocab "
          f"{cfg.vocab_size}); draft layer k={k}; {len(prompts)} prompts ({template} template, "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens), {n} new tokens each, "
          f"greedy, batch 1, float32")
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, jax {jax.__version__} ({jax.devices()[0].platform}, "
          f"{args.threads} threads)")

    def hf_run(**kw):
        def run(p):
            with torch.no_grad():
                out = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                                     **kw)
            return out[0, len(p):].tolist()
        return run

    rows, outs = [], {}
    hf_plain, secs = timed_passes(hf_run(), prompts, args.repeats)
    outs["hf greedy"] = hf_plain
    if any(len(t) != n for t in hf_plain):
        raise SystemExit(f"HF made {sorted({len(t) for t in hf_plain})} tokens, not {n}")
    rows.append(("hf greedy", secs, None, None))
    for name, kw in (("hf early-exit", {}),
                     ("hf early-exit, our policy", dict(
                         num_assistant_tokens=4, assistant_confidence_threshold=0.0,
                         num_assistant_tokens_schedule="heuristic_transient"))):
        # HF's candidate generator reads these from the model's own generation_config (the
        # assistant's), not from generate's arguments
        saved = {a: getattr(model.generation_config, a) for a in kw}
        for a, v in kw.items():
            setattr(model.generation_config, a, v)
        with count_hf_drafts() as c:
            o, secs = timed_passes(hf_run(assistant_early_exit=k), prompts, args.repeats)
        for a, v in saved.items():
            setattr(model.generation_config, a, v)
        runs = args.repeats + 1  # the counts add up the warm-up and every timed pass
        # each round is one full-model pass (the first one also reads the prompt)
        rows.append((name, secs, (c["accepted"] // runs, c["drafted"] // runs),
                     c["rounds"] / runs))
        outs[name] = o

    dec = Decoder(art.load_params(), cfg, max_draft=args.max_draft)
    slots = -(-(max(map(len, prompts)) + 8 + n) // 64) * 64

    def ours(**kw):
        def run(p):
            res = dec.generate([p], max_new_tokens=n, eos_id=(), max_len=slots, **kw)
            return res.tokens[0], res.stats
        return run

    o, secs = timed_passes(ours(mode="fixed"), prompts, args.repeats)
    outs["ours greedy"] = [t for t, _ in o]
    rows.append(("ours greedy", secs, None, None))
    o, secs = timed_passes(ours(mode="speculative", draft_layer=k), prompts, args.repeats)
    outs["ours speculative"] = [t for t, _ in o]
    st = [s for _, s in o]
    rows.append(("ours speculative", secs, (sum(s.accepted for s in st),
                                            sum(s.drafted for s in st)),
                 sum(s.full_passes for s in st)))

    total = len(prompts) * n
    print(f"\n| method (k={k}) | tokens/s | acceptance | tokens/full pass | same tokens as |")
    print("|---|---:|---:|---:|---|")
    for name, secs, acc, passes in rows:
        rate = f"{acc[0] / acc[1]:.3f} ({acc[0]}/{acc[1]})" if acc and acc[1] else "-"
        ref = "hf greedy" if name.startswith("hf") else "ours greedy"
        same = sum(a == b for a, b in zip(outs[name], outs[ref], strict=True))
        print(f"| {name} | {total / secs:.1f} | {rate} | "
              f"{total / passes if passes else 1.0:.2f} | {ref}: {same}/{len(prompts)} |")
    agree = sum(a == b for a, b in zip(outs["ours greedy"], outs["hf greedy"], strict=True))
    print(f"\nours greedy == hf greedy on {agree}/{len(prompts)} prompts")
    bad = [m for m in outs if m != "hf greedy" and outs[m] != outs[
        "hf greedy" if m.startswith("hf") else "ours greedy"]]
    if bad:
        print(f"MISMATCH: {bad} differ from their greedy output", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
