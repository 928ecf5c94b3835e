"""Decode latency per exit, self-speculative and early-exit speed-ups, in one run.

    python bench/decode.py                          # tiny random model (16 layers, width 256)
    python bench/decode.py --layers 8 --new-tokens 64 --batch 4
    python bench/decode.py --ckpt MODEL_DIR --prompt "Give three tips for staying healthy."
    python bench/decode.py --sections batched --batches 1,4,16   # vs plain greedy, per batch

`batched`: tokens/s of greedy self-speculative decoding (dynamic, the default: drafts only
when the measured costs and the acceptance say it pays; and always-draft, the old behaviour),
and of early exit with the paper's thresholds (every token checked, the default; and the batch
check schedule, `ee_min_saving` 0.2) against plain full-model greedy decoding, at each batch size
(prompts of different lengths), one interleaved run; and the compiled decode loop's memory
(`Decoder.memory`) against params + state. `plain/rounds`: rounds of the dynamic run that
drafted nothing, of all its rounds; `measured costs`: the dynamic decoder's measurement of one
draft pass and of a verify pass per width, relative to a plain step (`decoding.costs`). A round
of n drafts verified at width W costs about `n * k + W * (L - k)` layer-tokens on a
compute-bound CPU, one weight read of each on a memory-bound accelerator. "before" adds the
per-layout copies of the layer weights the decoder used to hold (every segment's sliced
layers: all L layers for a speculative layout).

Every number is a per-token decode time: (time(prefill + N tokens) - time(prefill + 1 token))
/ (N - 1), best of `--repeats` runs after a warm-up (compilation excluded). `max_new_tokens` is
a traced value, so both timings use the same compiled program. EOS is disabled so every mode
makes exactly N tokens.

Random weights make near-uniform next-token distributions: early exit then almost never passes
the paper's thresholds, and speculative acceptance says little about a trained SoFT model.
The numbers below are printed as measured; use `--ckpt` for a trained model.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax.decoding import Decoder, default_exits
from sorted_jax.decoding.sampling import top1_prob
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.modeling import abstract_params, make_model


def random_model(layers: int, width: int, vocab: int, seed: int, layer_scale: float = 1.0,
                 logit_scale: float = 1.0) -> tuple[dict, LlamaConfig]:
    """Random LLaMA, std-0.02 weights, unit norms. `layer_scale` < 1 shrinks every layer's
    residual update (o_proj, down_proj), so shallow exits agree more with the full model;
    `logit_scale` > 1 sharpens next-token distributions. Both are synthetic stand-ins for a
    trained SoFT model, to exercise acceptance and early exits; 1.0 = plain random."""
    heads = max(1, width // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=int(width * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096)
    import flax.linen as nn

    shapes = nn.unbox(abstract_params(make_model(cfg)))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(x.shape, jnp.float32)
        std = 0.02
        if "o_proj" in name or "down_proj" in name:
            std *= layer_scale
        if "lm_head" in name:
            std *= logit_scale
        return jnp.asarray(std * rng.standard_normal(x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes), cfg


def measure(dec: Decoder, prompts, n: int, repeats: int, runs: dict[str, dict]
            ) -> dict[str, tuple[float, dict]]:
    """Seconds per decoded token (prefill excluded) and the N-token run's stats, per label.

    All runs are interleaved repeat by repeat, and the minimum over repeats is kept, so
    ratios between runs are measured under the same (possibly shared) machine load.
    """
    max_len = int(np.ceil((max(len(p) for p in prompts) + n) / 64) * 64) + 64

    def timed(m, kw):
        kw = dict(kw)
        d = kw.pop("decoder", dec)  # a run may name its own decoder (other decoder settings)
        t0 = time.perf_counter()
        r = d.generate(prompts, max_new_tokens=m, eos_id=[], max_len=max_len, **kw)
        return time.perf_counter() - t0, r

    stats = {label: timed(n, kw)[1].stats for label, kw in runs.items()}  # compile, warm up
    t1 = {label: [] for label in runs}
    tn = {label: [] for label in runs}
    for _ in range(repeats):
        for label, kw in runs.items():
            t1[label].append(timed(1, kw)[0])
            tn[label].append(timed(n, kw)[0])
    return {label: (max(min(tn[label]) - min(t1[label]), 1e-9) / (n - 1), stats[label])
            for label in runs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="model dir / workdir (default: random model)")
    p.add_argument("--prompt", default="Give three tips for staying healthy.")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16, help="random-model prompt length")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--exits", default=None,
                   help="comma-separated exits to time (default: every L/8 layers)")
    p.add_argument("--draft-layers", default=None,
                   help="comma-separated draft depths (default: L/4, L/2, 3L/4)")
    p.add_argument("--max-draft", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute and KV-cache dtype (params stay as loaded); bfloat16 on a GPU")
    p.add_argument("--layer-scale", type=float, default=1.0,
                   help="random model: scale of each layer's residual update (synthetic)")
    p.add_argument("--logit-scale", type=float, default=1.0,
                   help="random model: scale of lm_head (synthetic; sharper distributions)")
    p.add_argument("--sections", default="fixed,speculative,early-exit",
                   help="comma-separated subset of fixed,speculative,early-exit,batched")
    p.add_argument("--batches", default="1,4,16", help="batched: batch sizes")
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))

    if args.ckpt:
        from sorted_jax.data import format_prompt, load_tokenizer
        from sorted_jax.io.model_io import load_params

        params, cfg, tok_dir = load_params(args.ckpt)
        tok = load_tokenizer(tok_dir or args.ckpt)
        ids = [tok.bos_id] + tok.encode(format_prompt(args.prompt))
        prompts = [ids] * args.batch
        what = f"checkpoint {args.ckpt}"
    else:
        params, cfg = random_model(args.layers, args.width, args.vocab, args.seed,
                                   args.layer_scale, args.logit_scale)
        rng = np.random.default_rng(args.seed)
        prompts = [[1] + rng.integers(3, cfg.vocab_size, args.prompt_len - 1).tolist()
                   for _ in range(args.batch)]
        what = "random weights (std 0.02)"
        if (args.layer_scale, args.logit_scale) != (1.0, 1.0):
            what += (f", SYNTHETIC layer-scale {args.layer_scale} logit-scale "
                     f"{args.logit_scale}")
    big_l = cfg.num_hidden_layers
    step = max(1, big_l // 8)
    exits = ([int(x) for x in args.exits.split(",")] if args.exits
             else sorted(set(range(step, big_l + 1, step)) | {big_l}))
    drafts = ([int(x) for x in args.draft_layers.split(",")] if args.draft_layers
              else sorted({max(1, big_l // 4), big_l // 2, 3 * big_l // 4} - {big_l}))
    dec = Decoder(params, cfg, dtype=jnp.dtype(args.dtype), max_draft=args.max_draft)
    n, reps = args.new_tokens, args.repeats
    if sections == {"batched"}:
        return batched(params, cfg, dec, args, drafts, what)

    print(f"model: {what}; L={big_l} D={cfg.hidden_size} V={cfg.vocab_size} "
          f"heads={cfg.num_attention_heads}/{cfg.kv_heads} {args.dtype}; batch {len(prompts)}, "
          f"prompt {len(prompts[0])} tokens, {n} new tokens; backend {jax.default_backend()} "
          f"({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}); "
          f"best of {reps}")
    runs: dict[str, dict] = {"full": {}}
    if "fixed" in sections:
        runs.update({f"fixed {k}": dict(mode="fixed", exit_layer=k) for k in exits
                     if k != big_l})
    if "speculative" in sections:
        runs.update({f"spec {k}": dict(mode="speculative", draft_layer=k) for k in drafts})
    ee_exits = default_exits(big_l)
    if len(ee_exits) < 3:
        ee_exits = tuple(exits)
    if "early-exit" in sections:
        # Thresholds: the paper's; never exit (>1: mechanism overhead); every threshold at
        # the median top-1 probability of the first exit along the full model's greedy path
        # (many tokens leave early, so the lazy K/V catch-up of deeper layers is timed);
        # 0 (every token leaves at the first exit).
        med = float(statistics.median(_first_exit_confidences(dec, prompts, ee_exits[0], n)))
        m = len(ee_exits) - 1
        ee_runs = {"paper": None, "never (>1)": [2.0] * m,
                   f"median@{ee_exits[0]} {med:.4f}": [med] * m, "all at first (0)": [0.0] * m}
        runs.update({f"ee {label}": dict(mode="early-exit", exits=ee_exits, thresholds=th)
                     for label, th in ee_runs.items()})
    res = measure(dec, prompts, n, reps, runs)
    full = res["full"][0]
    print(f"\nfull model: {full * 1e3:.3f} ms/token ({len(prompts) / full:.1f} tokens/s)")
    if "fixed" in sections:
        print("\nfixed exit (sub-model of depth k: k layers + norm + head)")
        print(f"{'k':>4} {'ms/token':>10} {'vs full':>8} {'k/L':>6}")
        for k in exits:
            t = res["full" if k == big_l else f"fixed {k}"][0]
            print(f"{k:>4} {t * 1e3:>10.3f} {t / full:>8.3f} {k / big_l:>6.3f}")
    if "speculative" in sections:
        print("\nself-speculative, greedy (output identical to the full model's)")
        print(f"{'draft':>5} {'ms/token':>10} {'speed-up':>8} {'accept':>7} "
              f"{'full passes':>11} {'tok/pass':>8}")
        for k in drafts:
            t, st = res[f"spec {k}"]
            print(f"{k:>5} {t * 1e3:>10.3f} {full / t:>8.3f} {st['acceptance_rate']:>7.3f} "
                  f"{st['full_passes']:>11} {st['tokens_per_full_pass']:>8.2f}")
    if "early-exit" in sections:
        print(f"\nearly exit over exits {list(ee_exits)}")
        print(f"{'thresholds':>22} {'ms/token':>10} {'speed-up':>8} {'avg exit':>8}")
        for label in ee_runs:
            t, st = res[f"ee {label}"]
            print(f"{label:>22} {t * 1e3:>10.3f} {full / t:>8.3f} "
                  f"{st['avg_exit_layer']:>8.2f}")
    sys.stdout.flush()
    return 0


def batched(params, cfg, dec: Decoder, args, drafts, what: str) -> int:
    """Speculative (dynamic, the default; and always-draft, the old behaviour) and early exit
    (every token checked, the default; and the batch check schedule, `ee_min_saving` 0.2)
    against plain full-model greedy decoding at several batch sizes, in one interleaved run;
    memory."""
    kw = dict(dtype=jnp.dtype(args.dtype), max_draft=args.max_draft)
    always = Decoder(params, cfg, speculation="always", **kw)
    sched = Decoder(params, cfg, ee_min_saving=0.2, **kw)
    n, reps = args.new_tokens, args.repeats
    k = drafts[len(drafts) // 2]
    big_l = cfg.num_hidden_layers
    exits = _trained_exits(args.ckpt) if args.ckpt else default_exits(big_l)
    rng = np.random.default_rng(args.seed)
    print(f"model: {what}; L={big_l} D={cfg.hidden_size} V={cfg.vocab_size}; draft layer {k}, "
          f"max_draft {args.max_draft}; early exit at {list(exits)} with the paper's "
          f"thresholds; {n} new tokens, {args.dtype}, backend {jax.default_backend()} "
          f"({os.cpu_count()} CPUs); best of {reps}; tokens/s = rows / s per decode step")
    held_out = _held_out_prompts(args.ckpt, 16) if args.ckpt else None
    spec_rows, ee_rows = [], []
    for b in [int(x) for x in args.batches.split(",")]:
        if held_out is not None:  # the checkpoint's own kind of prompt, different lengths
            prompts = [held_out[i % len(held_out)] for i in range(b)]
        else:
            prompts = [[1] + rng.integers(3, cfg.vocab_size, int(rng.integers(
                4, args.prompt_len + 1))).tolist() for _ in range(b)]
        spec = dict(mode="speculative", draft_layer=k)
        ee = dict(mode="early-exit", exits=exits)
        checks = dict(ee, thresholds=[1.0] * (len(exits) - 1))  # checked, (almost) never pass
        res = measure(dec, prompts, n, reps, {
            "full": {}, "dynamic": spec, "always": dict(spec, decoder=always),
            "ee": ee, "ee sched": dict(ee, decoder=sched), "checks only": checks})
        t = {label: b / r[0] for label, r in res.items()}
        st_d, st_a = res["dynamic"][1], res["always"][1]
        costs = [c for key, c in dec.measured_costs.items() if key[1] == b]
        spec_rows.append((b, t, st_d, st_a, costs[-1] if costs else None))
        ee_rows.append((b, t, res["ee"][1], res["ee sched"][1]))
    print("\nself-speculative, greedy (output identical to the full model's)")
    print(f"{'batch':>5} {'full tok/s':>10} {'dynamic':>8} {'dyn/full':>8} {'always':>8} "
          f"{'alw/full':>8} {'accept dyn/alw':>14} {'plain/rounds dyn':>16} "
          f"{'measured costs: draft; verify by width':>40}")
    for b, t, st_d, st_a, c in spec_rows:
        cost = "" if c is None else f"{c.draft:.2f}; " + " ".join(
            f"{w}:{v:.2f}" for w, v in c.verify.items())
        print(f"{b:>5} {t['full']:>10.1f} {t['dynamic']:>8.1f} {t['dynamic'] / t['full']:>8.2f} "
              f"{t['always']:>8.1f} {t['always'] / t['full']:>8.2f} "
              f"{f'{st_d.acceptance_rate:.2f}/{st_a.acceptance_rate:.2f}':>14} "
              f"{f'{st_d.plain_rounds}/{st_d.full_passes - 1}':>16} {cost:>40}")
    print(f"\nearly exit at {list(exits)}, paper thresholds: every token checked (default) and "
          "the batch check schedule (ee_min_saving 0.2); 'checks only': every exit checked at "
          "threshold 1.0 (nothing exits: the ladder and its checks, no saving)")
    print(f"{'batch':>5} {'full tok/s':>10} {'ee':>8} {'ee/full':>8} {'avg exit':>8} "
          f"{'sched tok':>9} {'sched/full':>10} {'avg exit':>8} {'checks only/full':>16}")
    for b, t, st_e, st_v in ee_rows:
        print(f"{b:>5} {t['full']:>10.1f} {t['ee']:>8.1f} {t['ee'] / t['full']:>8.2f} "
              f"{st_e.avg_exit_layer:>8.2f} {t['ee sched']:>9.1f} "
              f"{t['ee sched'] / t['full']:>10.2f} {st_v.avg_exit_layer:>8.2f} "
              f"{t['checks only'] / t['full']:>16.2f}")
    print(f"\ndecode memory (compiled loop, batch 4, draft layer {k}; MiB)")
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(params["layers"]))
    print(f"{'layout':>24} {'params':>8} {'state':>8} {'temp':>8} {'copies':>8} {'peak':>8} "
          f"{'before':>8}")
    prompts = [[1] + [5] * args.prompt_len] * 4
    for label, kw in (("speculative", dict(mode="speculative", draft_layer=k)),
                      ("fixed k", dict(mode="fixed", exit_layer=k)),
                      ("early-exit", dict(mode="early-exit"))):
        m = dec.memory(prompts, max_new_tokens=n, **kw)
        route = dec.route(**kw)
        big_l = cfg.num_hidden_layers
        copied = sum(b - a for a, b in route.bounds if (a, b) != (0, big_l)) / big_l
        before = m.peak + copied * layer_bytes

        def mib(x):
            return f"{x / 2**20:>8.2f}"

        print(f"{label:>24} {mib(m.params)} {mib(m.state)} {mib(m.temp)} "
              f"{mib(m.weight_copies)} {mib(m.peak)} {mib(before)}")
    sys.stdout.flush()
    return 0


def _trained_exits(ckpt: str) -> tuple[int, ...]:
    """The exits the checkpoint was trained with (what `serve` / `generate` default to)."""
    from sorted_jax.io import artifacts

    return tuple(artifacts.inspect(ckpt).default_exits())


def _held_out_prompts(ckpt: str, n: int) -> list[list[int]]:
    """Prompt ids of the builtin held-out records under the checkpoint's own template (the
    distribution a `configs/tiny.py` run was trained on)."""
    from sorted_jax.data import prompt_ids
    from sorted_jax.data.builtin import builtin_records
    from sorted_jax.io import artifacts

    art = artifacts.inspect(ckpt)
    tok = art.tokenizer()
    recs = builtin_records("eval")[:n]
    return [prompt_ids(tok, {"instruction": r["instruction"], "input": r["input"]},
                       art.settings.template or "none") for r in recs]


def _first_exit_confidences(dec: Decoder, prompts, k: int, n: int) -> list[float]:
    """Top-1 probabilities of exit k along the full model's greedy continuation."""
    from sorted_jax.model.modeling import slice_layers

    res = dec.generate(prompts[:1], max_new_tokens=min(n, 64), eos_id=[])
    seq = prompts[0] + res.tokens[0]
    cfg = dec.config.submodel(k)
    model = make_model(cfg)
    logits = model.apply({"params": slice_layers(dec.params, 0, k)},
                         jnp.asarray([seq]), method=lambda m, x: m.head(m(x).hidden[-1]))
    return np.asarray(top1_prob(logits[0, len(prompts[0]) - 1:])).tolist()


if __name__ == "__main__":
    sys.exit(main())
