"""Train-step time of full SoFT, SFT, LoRA-SoFT (two ranks) and QLoRA-SoFT, in the same run.

    python bench/lora_step.py                                   # the tiny demo's step (CPU)
    python bench/lora_step.py --size 7b-l8 --batch 4 --seq 2048  # 8 LLaMA-2-7B layers (GPU)

The recipes of the quality table in docs/lora.md: the same model, exits, batch and optimizer
(AdamW), one compiled step each, timed interleaved round by round (the machine is shared and
noisy: compare within one run). Prints one JSON line per recipe: median seconds per step, the
steps' dot FLOPs from the compiled HLO (a LoRA step computes no weight gradient: about 2/3 of
a full step's matmul FLOPs), and the state bytes per device (params + optimizer state; for
LoRA the frozen base apart).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax.model import modeling
from sorted_jax.model.config import LlamaConfig, preset
from sorted_jax.model.lora import LoraSpec
from sorted_jax.parallel import sharding
from sorted_jax.tools import hlo_stats
from sorted_jax.tools.memory_planner import _sharded_bytes
from sorted_jax.training import train_step

SIZES = {
    # configs/tiny_finetune.py's model (the tiny preset on the byte tokenizer), exits 2,4,6,8
    "tiny": (preset("tiny").replace(vocab_size=264), (2, 4, 6, 8)),
    "7b-l8": (preset("llama2-7b").replace(num_hidden_layers=8), (4, 6, 8)),
}
# name -> (LoRA spec or None, exits: "soft" or "sft")
RECIPES = {
    "soft": (None, "soft"), "sft": (None, "sft"),
    "lora-r8": (LoraSpec(rank=8, alpha=16, base_dtype="float32"), "soft"),
    "lora-r32": (LoraSpec(rank=32, alpha=64, base_dtype="float32"), "soft"),
    "qlora-r32": (LoraSpec(rank=32, alpha=64, base_dtype="nf4"), "soft"),
}


def build(cfg: LlamaConfig, exits, spec, dtype, mesh):
    tx, _ = train_step.make_optimizer(lr=1e-3, total_steps=1000)
    if spec is not None and jnp.dtype(dtype) != jnp.float32 and spec.base_dtype == "float32":
        spec = LoraSpec(**{**spec.to_dict(), "base_dtype": "bfloat16"})
    model = modeling.make_model(cfg, dtype=dtype, lora=spec, attention_impl="auto",
                                param_dtype=jnp.float32 if spec is None else spec.float_dtype)
    steps = train_step.SoftSteps(model, exits, tx, mesh)
    params = modeling.init_params(model, jax.random.PRNGKey(0))
    return steps, steps.state_from_params(params)


def batch_for(cfg, b, t, shardings, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocab_size, (b, t)).astype(np.int32)
    host = {"input_ids": ids, "targets": np.roll(ids, -1, 1),
            "loss_mask": np.ones((b, t), np.float32), "attention_mask": np.ones((b, t), np.int32)}
    return train_step.to_global_batch(host, shardings)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=48)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--recipes", default=",".join(RECIPES))
    args = p.parse_args()
    cfg, soft_exits = SIZES[args.size]
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    runs = {}
    for name in args.recipes.split(","):
        spec, kind = RECIPES[name]
        exits = soft_exits if kind == "soft" else (cfg.num_hidden_layers,)
        steps, state = build(cfg, exits, spec, dtype, mesh)
        batch = batch_for(cfg, args.batch, args.seq, steps.batch_shardings)
        flops = hlo_stats.analyse(steps.lower_train_step((args.batch, args.seq)).compile()
                                  .as_text()).dot_flops
        for _ in range(2):  # compile + warm up
            state, m = steps.train_step(state, batch)
        jax.block_until_ready(m)
        trained = _sharded_bytes(steps.abstract_state, steps.state_shardings)
        frozen = 0.0 if steps.abstract_frozen is None else _sharded_bytes(
            steps.abstract_frozen, steps.frozen_shardings)
        runs[name] = dict(steps=steps, state=state, batch=batch, times=[], flops=flops,
                          state_bytes=trained, frozen_bytes=frozen)
    for _ in range(args.rounds):  # interleaved: the machine's load hits every recipe alike
        for r in runs.values():
            t0 = time.perf_counter()
            r["state"], m = r["steps"].train_step(r["state"], r["batch"])
            jax.block_until_ready(m)
            r["times"].append(time.perf_counter() - t0)
    base = statistics.median(runs["soft"]["times"]) if "soft" in runs else None
    for name, r in runs.items():
        med = statistics.median(r["times"])
        print(json.dumps({
            "recipe": name, "size": args.size, "batch": args.batch, "seq": args.seq,
            "dtype": args.dtype, "device": jax.devices()[0].device_kind,
            "median_step_s": round(med, 5), "vs_soft": None if base is None else round(
                med / base, 3), "dot_gflops": round(r["flops"] / 1e9, 3),
            "state_mib": round(r["state_bytes"] / 2**20, 2),
            "frozen_base_mib": round(r["frozen_bytes"] / 2**20, 2),
            "trained_params": int(sum(x.size for x in jax.tree.leaves(r["state"].params))),
        }), flush=True)


if __name__ == "__main__":
    main()
