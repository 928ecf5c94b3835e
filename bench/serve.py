"""Server throughput and per-token latency per decoding mode, at several concurrencies.

    python bench/serve.py --ckpt MODEL_DIR                      # e.g. a configs/tiny.py run
    python bench/serve.py                                       # a random 8-layer model
    python bench/serve.py --concurrency 1,4,16 --requests 32 --max-tokens 32

Starts `python -m sorted_jax.serve` on 127.0.0.1 (a free port), and for each mode (full,
fixed-k, early-exit, speculative) and concurrency C runs C clients (the official `openai`
package, non-streaming, greedy), each sending requests back to back until `--requests` are
done. Reports requests/s and the p50 / p95 of per-token latency (a request's wall time /
its completion tokens, so queueing and prefill count), of the fastest of `--repeats` timed
runs. The server compiles every batch
bucket of the four modes at start (`--warmup`, including the program that lets a request
join a running speculative batch) and each (mode, C) runs once untimed first, so compilation
is excluded. All modes run in the same
server, so they share one machine state; on a shared CPU compare within one run only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_model_dir(path: Path, layers: int, width: int) -> Path:
    """A random model (builtin byte tokenizer) for a self-contained run."""
    from sorted_jax.data.tokenizers import save_tokenizer_files
    from sorted_jax.io.model_io import save_model_dir
    from sorted_jax.model.config import LlamaConfig
    from sorted_jax.model.modeling import init_params, make_model

    cfg = LlamaConfig(vocab_size=264, hidden_size=width, intermediate_size=width * 2,
                      num_hidden_layers=layers, num_attention_heads=max(1, width // 32),
                      num_key_value_heads=max(1, width // 64), max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2)
    params = jax.device_get(init_params(make_model(cfg), jax.random.PRNGKey(0)))
    save_model_dir(path, params, cfg)
    save_tokenizer_files("builtin", path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="model dir / workdir (default: random model)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=16, help="per (mode, concurrency)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs per cell; the fastest is reported (shared machines)")
    p.add_argument("--exit-layer", type=int, default=None, help="fixed-k (default L/2)")
    p.add_argument("--draft-layer", type=int, default=None, help="speculative (default L/2)")
    p.add_argument("--prompt", default="Give three tips for staying healthy.")
    args = p.parse_args(argv)
    import openai

    from sorted_jax.io import artifacts

    tmp = tempfile.TemporaryDirectory()
    ckpt = Path(args.ckpt) if args.ckpt else random_model_dir(Path(tmp.name) / "model",
                                                              args.layers, args.width)
    big_l = artifacts.inspect(ckpt).config.num_hidden_layers
    half = max(1, big_l // 2)
    modes = {
        "full": {},
        f"fixed-{args.exit_layer or half}": {"exit_layer": args.exit_layer or half},
        "early-exit": {"mode": "early-exit"},
        f"speculative-{args.draft_layer or half}": {"mode": "speculative",
                                                    "draft_layer": args.draft_layer or half},
    }
    port = _free_port()
    warm = (f"fixed,fixed:{args.exit_layer or half},early-exit,"
            f"speculative:{args.draft_layer or half}")
    proc = subprocess.Popen([sys.executable, "-m", "sorted_jax.serve", "--ckpt", str(ckpt),
                             "--port", str(port), "--max-batch", "16", "--max-queue", "256",
                             "--warmup", warm],
                            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=url, api_key="none", timeout=600, max_retries=0)
        prompts = [f"{args.prompt} ({i})" for i in range(args.requests)]

        def one(i: int, extra: dict) -> tuple[float, int]:
            t0 = time.perf_counter()
            r = client.completions.create(model="m", prompt=prompts[i], temperature=0,
                                          max_tokens=args.max_tokens, extra_body=extra)
            return time.perf_counter() - t0, r.usage.completion_tokens

        def run(c: int, extra: dict) -> tuple[float, list[float]]:
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(c) as pool:
                got = list(pool.map(lambda i: one(i, extra), range(args.requests)))
            return time.perf_counter() - t0, [s / max(n, 1) for s, n in got]

        print(f"model: {ckpt if args.ckpt else 'random'} (L={big_l}); {args.requests} requests "
              f"per cell, max_tokens {args.max_tokens}, greedy; {os.cpu_count()} CPUs, "
              f"backend {jax.default_backend()}")
        print(f"{'mode':>16} {'conc':>5} {'req/s':>7} {'tok-lat p50 ms':>15} "
              f"{'tok-lat p95 ms':>15}")
        for c in [int(x) for x in args.concurrency.split(",")]:
            for label, extra in modes.items():
                run(c, extra)  # compile this (mode, batch buckets), untimed
                wall, lat = min((run(c, extra) for _ in range(args.repeats)),
                                key=lambda r: r[0])
                print(f"{label:>16} {c:>5} {args.requests / wall:>7.2f} "
                      f"{np.percentile(lat, 50) * 1e3:>15.2f} "
                      f"{np.percentile(lat, 95) * 1e3:>15.2f}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
