"""Peak memory and wall time of `python -m sorted_jax.convert`, as multiples of the model size.

Builds a random fp32 HF LLaMA (default ~0.9 GB: hidden 1024, 12 layers, vocab 32000) in a temp
dir, then runs each conversion in its own subprocess and reads that child's peak RSS with
`os.wait4` (ru_maxrss). Goal: peak RSS <= 1.5x the model size. The baseline row is a process
that only imports what the converter imports (Python + JAX + Orbax), so "over baseline" is the
memory the conversion itself adds.

    python bench/convert.py [--hidden 1024 --layers 12 --vocab 32000 --keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20


def run_child(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one subprocess."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(argv)}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def build_hf_model(out: Path, hidden: int, layers: int, vocab: int, inter: int,
                   shard: str | None) -> int:
    """Save a random HF model (in a child process, see `main`); returns its fp32 bytes."""
    import torch
    import transformers

    from sorted_jax.model.config import LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64)
    torch.manual_seed(0)
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict()))
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, **kw)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--keep", type=Path, default=None, help="work in this dir and keep it")
    ap.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shard", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build is not None:
        n = build_hf_model(args.build, args.hidden, args.layers, args.vocab, args.intermediate,
                           args.shard or None)
        (args.build / "bytes").write_text(str(n))
        return

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    try:
        print(f"building random HF llama in {work} ...", file=sys.stderr)
        # Built in a child: ru_maxrss survives fork + exec, so the measuring parent must stay
        # small (a parent holding the torch model would inflate every child's figure).
        for name, shard in (("hf", None), ("hf_sharded", "200MB")):
            subprocess.run([py, __file__, "--build", str(work / name), "--shard", shard or "",
                            "--hidden", str(args.hidden), "--layers", str(args.layers),
                            "--vocab", str(args.vocab), "--intermediate",
                            str(args.intermediate)], check=True)
        size = int((work / "hf" / "bytes").read_text())
        cases = [
            ("baseline (imports only)",
             [py, "-c", "import jax, jax.numpy as jnp, orbax.checkpoint, tqdm, sorted_jax.convert,"
                        " sorted_jax.model.modeling; jnp.zeros(1).block_until_ready()"]),
            ("hf-to-orbax, 1 safetensors file",
             [py, "-m", "sorted_jax.convert", "hf-to-orbax", "--hf", str(work / "hf"),
              "--out", str(work / "md"), "--no-progress"]),
            ("hf-to-orbax, 200MB shards",
             [py, "-m", "sorted_jax.convert", "hf-to-orbax", "--hf", str(work / "hf_sharded"),
              "--out", str(work / "md2"), "--no-progress"]),
            ("hf-to-orbax, --dtype bfloat16",
             [py, "-m", "sorted_jax.convert", "hf-to-orbax", "--hf", str(work / "hf"),
              "--out", str(work / "md_bf16"), "--dtype", "bfloat16", "--no-progress"]),
            ("orbax-to-hf, full model",
             [py, "-m", "sorted_jax.convert", "orbax-to-hf", "--ckpt", str(work / "md"),
              "--out", str(work / "hf_out"), "--no-progress"]),
            ("orbax-to-hf, 500MB shards",
             [py, "-m", "sorted_jax.convert", "orbax-to-hf", "--ckpt", str(work / "md"),
              "--out", str(work / "hf_out2"), "--shard-size", "500MB", "--no-progress"]),
            (f"orbax-to-hf, --exit-layer {args.layers // 2}",
             [py, "-m", "sorted_jax.convert", "orbax-to-hf", "--ckpt", str(work / "md"),
              "--out", str(work / "hf_sub"), "--exit-layer", str(args.layers // 2),
              "--no-progress"]),
        ]
        print(f"\nmodel: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32, "
              f"{size / MiB:.0f} MiB\n")
        print(f"{'case':36s} {'wall s':>7s} {'peak MiB':>9s} {'peak/model':>11s} "
              f"{'over base/model':>16s}")
        base = 0
        for name, argv in cases:
            wall, peak = run_child(argv)
            if name.startswith("baseline"):
                base = peak
            print(f"{name:36s} {wall:7.1f} {peak / MiB:9.0f} {peak / size:11.2f} "
                  f"{(peak - base) / size:16.2f}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
