"""Packing benchmark: real (non-pad) training tokens/s, packed rows vs bucketed batches, same run.

    python bench/packing.py                       # alpaca_en_demo.json, LLaMA-2 tokenizer,
                                                  # max_len 512 and 2048 (CPU: a few minutes)
    python bench/packing.py --max-len 512 2048 --batch 8 --width 256 --layers 4 --repeats 5

Both streams come from the same tokenized records (Alpaca template, loss on responses) and the
same (seed, epoch) shuffle: bucketed batches are padded to the smallest power-of-two bucket that
holds their longest example (`DataIterator`), packed rows hold as many examples as fit in
`max_len` (`PackedIterator`, segment ids + per-example positions). Real tokens/s is measured over
a whole epoch without running it: the epoch's batches are counted by shape (real tokens, how
many batches of each shape), each distinct shape is compiled and then timed over `--repeats`
steps (median), and the epoch's time is the sum of count x step time. Prints one JSON line per
(max_len, stream) and a summary line with the packed / bucketed ratio of real tokens/s (the
machine may be shared: only ratios inside one run mean anything).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import optax

from sorted_jax.data import (
    DataIterator,
    PackedIterator,
    load_tokenizer,
    read_json_records,
    tokenize_records,
)
from sorted_jax.model import modeling
from sorted_jax.model.config import LlamaConfig
from sorted_jax.parallel import sharding
from sorted_jax.training import train_step

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def measure(steps: train_step.SoftSteps, it, repeats: int) -> dict:
    """Real tokens/s of training one epoch of the stream `it` (see the module docstring)."""
    first: dict[tuple, dict] = {}
    count: dict[tuple, int] = {}
    real = slots = 0
    for _ in range(it.steps_per_epoch):
        b = next(it)
        key = (tuple(sorted(b)), b["input_ids"].shape)
        first.setdefault(key, b)
        count[key] = count.get(key, 0) + 1
        real += int(np.sum(b["attention_mask"]))
        slots += b["attention_mask"].size
    state = steps.init_state(jax.random.PRNGKey(0))
    step_s = {}
    for key, b in first.items():
        gb = train_step.to_global_batch(b, steps.batch_shardings)
        state, m = steps.train_step(state, gb)  # compile
        jax.block_until_ready(m["loss"])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            state, m = steps.train_step(state, gb)
            jax.block_until_ready(m["loss"])
            times.append(time.perf_counter() - t0)
        step_s[key] = statistics.median(times)
    epoch_s = sum(count[k] * step_s[k] for k in count)
    return {"steps_per_epoch": it.steps_per_epoch, "epoch_real_tokens": real,
            "fill": round(real / slots, 4), "epoch_s": round(epoch_s, 2),
            "real_tok_per_s": round(real / epoch_s, 1),
            "step_s_by_shape": {"x".join(map(str, k[1])): [count[k], round(step_s[k], 3)]
                                for k in sorted(count, key=lambda k: k[1])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ASSETS / "alpaca_en_demo.json"))
    ap.add_argument("--tokenizer", default=str(ASSETS / "llama2_tokenizer.model"))
    ap.add_argument("--template", default="alpaca")
    ap.add_argument("--max-len", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--batch", type=int, default=4, help="rows per step (both streams)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per batch shape")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--exits", default="", help="exit layers, e.g. 1,2 (default: every layer)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tok = load_tokenizer(args.tokenizer)
    records = read_json_records(args.data)
    exits = ([int(x) for x in args.exits.split(",")] if args.exits
             else list(range(1, args.layers + 1)))
    heads = max(1, args.width // 64)
    dtype = modeling.DTYPES[args.dtype]
    print(f"# backend {jax.default_backend()}: {jax.devices()[0].device_kind}; {len(records)} "
          f"records from {args.data}; tokenizer {args.tokenizer} ({tok.vocab_size} ids); model "
          f"{args.layers} x {args.width}, exits {exits}, batch {args.batch}", flush=True)
    summary = {}
    for max_len in args.max_len:
        cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=args.width,
                          intermediate_size=int(args.width * 8 / 3) // 8 * 8,
                          num_hidden_layers=args.layers, num_attention_heads=heads,
                          num_key_value_heads=heads, max_position_embeddings=max_len)
        model = modeling.make_model(cfg, dtype=dtype, attention_impl="xla")
        mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
        steps = train_step.SoftSteps(model, exits=exits, tx=optax.adamw(1e-4), mesh=mesh)
        ds = tokenize_records(records, tok, max_len, args.template)
        streams = {
            "bucketed": DataIterator(ds, args.batch, seed=args.seed),
            "packed": PackedIterator(ds, args.batch, seed=args.seed),
        }
        rows = {}
        for name, it in streams.items():
            rows[name] = {"max_len": max_len, "stream": name,
                          **measure(steps, it, args.repeats)}
            print(json.dumps(rows[name]), flush=True)
        summary[f"packed_over_bucketed_real_tok_per_s_{max_len}"] = round(
            rows["packed"]["real_tok_per_s"] / rows["bucketed"]["real_tok_per_s"], 2)
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
