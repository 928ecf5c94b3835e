"""Train-step benchmark: SoFT vs SFT, and ours vs the PyTorch/HF peer, in the same run.

    python bench/train_step.py --size cpu-bench --batch 4 --seq 512          # CPU
    python bench/train_step.py --size 1b --batch 8 --seq 2048 --peer-compile  # one GPU

Prints one JSON line per measurement and a summary of ratios (the machine is shared and noisy:
only ratios inside one run mean anything). Each exit set is measured in a process of its own
(`--only NAME`), so its peak memory is its own: a device's peak cannot be reset in-process.
The SoFT/SFT time ratio is printed next to the theoretical FLOP ratio: each extra exit adds
6 x width x vocab FLOPs a token (our loss fuses the gradient into the forward pass, so there is
no recompute).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax.model import modeling
from sorted_jax.model.config import LlamaConfig
from sorted_jax.parallel import sharding
from sorted_jax.tools.memory_planner import plan_steps
from sorted_jax.training import train_step

PEER = Path(__file__).resolve().parents[2] / "shared" / "bench" / "peer_soft_torch.py"

# The peer's --size presets, same shapes and exit sets.
SIZES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
             {"sft": [4], "soft4": [1, 2, 3, 4]}),
    "cpu-bench": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=4, vocab_size=32000),
                  {"sft": [8], "soft4": [2, 4, 6, 8]}),
    "1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                max_position_embeddings=4096),
           {"sft": [22], "soft8": [8, 10, 12, 14, 16, 18, 20, 22]}),
    "7b-l16": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
               {"sft": [16], "soft8": [6, 8, 9, 10, 12, 13, 14, 16]}),
}


def flops_per_token(cfg: LlamaConfig, seq: int, n_exits: int) -> float:
    """Same count as the peer: 6 x matmul params (+ one head per exit) + causal attention."""
    d, n_layers, v, f = (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size,
                         cfg.intermediate_size)
    kv = cfg.kv_heads * cfg.dim_per_head
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f
    return 6 * (n_layers * per_layer + n_exits * d * v) + 6 * n_layers * seq * d


def run_ours(cfg, exits, args) -> dict:
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = modeling.make_model(cfg, dtype=dtype, attention_impl=args.attention,
                                remat_policy=args.remat)
    mesh = sharding.make_mesh((-1, 1, 1))
    tx, _ = train_step.make_optimizer(lr=1e-5, total_steps=1000, clip_norm=None)
    steps = train_step.SoftSteps(model, exits=exits, tx=tx, mesh=mesh,
                                 rows_per_chunk=args.rows_per_chunk)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    batch = train_step.to_global_batch(
        {"input_ids": ids, "targets": np.roll(ids, -1, 1),
         "loss_mask": np.ones(ids.shape, np.float32),
         "attention_mask": np.ones(ids.shape, np.int32)}, steps.batch_shardings)
    mem = plan_steps(steps, (args.batch, args.seq))
    state = steps.init_state(jax.random.PRNGKey(0))
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, metrics = steps.train_step(state, batch)
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    toks = args.batch * args.seq
    return {"impl": "sorted_jax", "size": args.size, "exits": list(exits),
            "step_s": round(dt, 4), "tok_per_s": round(toks / dt),
            "model_tflops": round(flops_per_token(cfg, args.seq, len(exits)) * toks / dt / 1e12,
                                  2),
            "compiled_temp_GiB": round(mem.compiled_temp_bytes / 2**30, 3),
            "compiled_args_GiB": round(mem.compiled_argument_bytes / 2**30, 3),
            "peak_mem_GiB": None if peak is None else round(peak / 2**30, 2)}


def run_one(name: str) -> tuple[str, dict]:
    """(its backend line, its row): exit set `name` measured by this script with `--only` in
    a fresh process."""
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", name,
                          "--no-peer"], capture_output=True, text=True)
    rows = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not rows:
        sys.exit(f"measuring {name} failed:\n{out.stderr[-3000:]}")
    backend = next((x for x in out.stdout.splitlines() if x.startswith("# backend")), "")
    row = rows[-1]
    row.pop("mode", None)
    return backend, row


def run_peer(args) -> list[dict]:
    peer = Path(args.peer_script)
    if not peer.exists():
        print(f"# peer script not found at {peer}; skipping the peer", file=sys.stderr)
        return []
    cmd = [sys.executable, str(peer), "--size", args.size, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--dtype", args.dtype]
    if args.peer_compile:
        cmd.append("--compile")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return []
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    rows = [r for r in rows if "mode" in r]
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over children so far
    for r in rows:
        r["peer_process_max_rss_GiB"] = round(rss / 2**20, 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="cpu-bench", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "blockwise"])
    ap.add_argument("--remat", default="none", choices=list(modeling.REMAT_POLICY_NAMES))
    ap.add_argument("--rows-per-chunk", type=int, default=4096)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-compile", action="store_true")
    ap.add_argument("--peer-script", default=str(PEER),
                    help="the peer's script (default: ../shared/bench/peer_soft_torch.py; a GPU "
                         "machine gets a copy carried inside the repo, see bench/gpu_suite.sh)")
    ap.add_argument("--only", default=None,
                    help="measure this one exit set (sft, soft4, ...) in this process and print "
                         "its JSON line; without it, each set runs in a process of its own")
    args = ap.parse_args()

    cfg_kw, exit_sets = SIZES[args.size]
    cfg = LlamaConfig(max_position_embeddings=max(4096, args.seq), **cfg_kw)
    if args.only is not None:
        if args.only not in exit_sets:
            ap.error(f"--only {args.only!r}: {args.size} has {sorted(exit_sets)}")
        row = run_ours(cfg, exit_sets[args.only], args)
        print(f"# backend {jax.default_backend()}, {jax.device_count()} device(s): "
              f"{jax.devices()[0].device_kind}", flush=True)
        print(json.dumps({"mode": args.only, "pid": os.getpid(), **row}), flush=True)
        return
    # The peer first: its max RSS is read from this process's children (RUSAGE_CHILDREN),
    # which must not include ours yet.
    peer_rows = [] if args.no_peer else run_peer(args)
    # One process per exit set, and none in this one (which touches no device): a device's
    # peak memory cannot be reset, so a second set measured in one process would report the
    # larger of both peaks.
    ours = {}
    for i, name in enumerate(exit_sets):
        backend, ours[name] = run_one(name)
        if i == 0:
            print(backend, flush=True)
        print(json.dumps({"mode": name, **ours[name]}), flush=True)
    sft, soft_name = ours["sft"], next(n for n in exit_sets if n != "sft")
    soft = ours[soft_name]
    theory = (flops_per_token(cfg, args.seq, len(exit_sets[soft_name]))
              / flops_per_token(cfg, args.seq, 1))
    summary = {"soft_over_sft_time": round(soft["step_s"] / sft["step_s"], 3),
               "soft_over_sft_flops_theory": round(theory, 3),
               "soft_over_sft_compiled_temp": round(
                   soft["compiled_temp_GiB"] / max(sft["compiled_temp_GiB"], 1e-9), 3)}
    if not args.no_peer:
        peer = {r["mode"]: r for r in peer_rows if "error" not in r}
        for r in peer.values():
            print(json.dumps(r), flush=True)
        for name in exit_sets:
            if name in peer:
                summary[f"ours_over_peer_tok_per_s_{name}"] = round(
                    ours[name]["tok_per_s"] / peer[name]["tok_per_s"], 3)
                peer_mem, our_mem = peer[name].get("peak_mem_GiB"), ours[name]["peak_mem_GiB"]
                if our_mem and peer_mem and peer_mem == peer_mem:  # not NaN (CPU)
                    summary[f"ours_over_peer_peak_mem_{name}"] = round(our_mem / peer_mem, 3)
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
