"""`python -m sorted_jax.ict`: SFT+ICT, the paper's baseline: freeze an SFT model, train one
extra head per exit (the heads are `sorted_jax.objective.heads`, their training
`sorted_jax.training.ict_trainer`).

    python -m sorted_jax.ict --ckpt /tmp/sft_tiny --data builtin --out /tmp/sft_ict
    python -m sorted_jax.evaluate --ckpt /tmp/soft_tiny --ckpt /tmp/sft_tiny \\
        --ckpt /tmp/sft_ict --data builtin --out /tmp/eval

Each exit n gets its own head (final RMSNorm scale + lm_head kernel, initialised from the
model's shared ones); the trunk is frozen. One epoch by default. Defaults (data, template,
max_len, batch size, lr, dtype, held-out records) come from what the SFT run recorded.

Artifact (`--out DIR`): a model dir that every tool reads as the (unchanged) SFT model, plus
`ict_heads/` and `ict.json` beside it; `python -m sorted_jax.evaluate --ckpt DIR` finds the
heads and scores exit n with head n.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sorted_jax.core.errors import IctError, run_cli
from sorted_jax.data import TEMPLATE_NAMES
from sorted_jax.io import artifacts, destinations, ict_dir, model_io
from sorted_jax.objective import soft
from sorted_jax.parallel import sharding
from sorted_jax.training.ict_trainer import IctRecipe, train_ict_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sorted_jax.ict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="SFT+ICT: freeze an SFT model and train one head (final norm + lm_head) "
                    "per exit. Writes a model dir with the heads beside it.")
    p.add_argument("--ckpt", required=True, help="the SFT model: model dir or training workdir")
    p.add_argument("--out", required=True, help="output dir (model dir + ict_heads/ + ict.json)")
    p.add_argument("--data", default=None,
                   help="training data: builtin, tfds:NAME or a JSON/JSONL file "
                        "(default: the SFT run's data.train)")
    p.add_argument("--split", default="train")
    p.add_argument("--exits", default=None,
                   help="exit layers, e.g. 2,4,6,8 or all (default: the SFT run's eval exits, "
                        "else the SoFT default set)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--num-steps", type=int, default=0, help="> 0: exactly this many steps")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (cosine, AdamW); default: the SFT run's")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step (default: the SFT run's, else 32)")
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--template", default=None, choices=TEMPLATE_NAMES)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer spec (builtin, .model file, dir); default: the checkpoint's")
    p.add_argument("--holdout", type=int, default=None,
                   help="records held out of a JSON file by the SFT run (default: its "
                        "data.eval_holdout when --data is its data.train); excluded here")
    p.add_argument("--seed", type=int, default=0, help="data shuffle order")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype of the frozen trunk (default: the SFT run's)")
    p.add_argument("--mesh", default="-1,1,1", help="mesh shape data,fsdp,tensor")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--overwrite", action="store_true")
    return p


COMMAND = "sorted_jax.ict"


def _is_ict_dir(path: Path) -> bool:
    """An ICT dir as this command writes it (also those written before markers existed)."""
    return model_io.is_model_dir(path) and ict_dir.has_heads(path)


def _check_numbers(args: argparse.Namespace) -> None:
    """Flags that must be positive, refused before anything is loaded."""
    bad = [f"--lr must be > 0, got {args.lr}" if args.lr is not None and not args.lr > 0 else "",
           f"--epochs must be > 0, got {args.epochs}" if not args.epochs > 0 else "",
           f"--num-steps must be >= 0, got {args.num_steps}" if args.num_steps < 0 else "",
           f"--warmup-steps must be >= 0, got {args.warmup_steps}" if args.warmup_steps < 0
           else "",
           f"--log-every must be >= 1, got {args.log_every}" if args.log_every < 1 else ""]
    bad += [f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
            for name in ("batch_size", "max_len")
            if getattr(args, name) is not None and getattr(args, name) < 1]
    bad = [b for b in bad if b]
    if bad:
        raise IctError("; ".join(bad))


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check_numbers(args)
    dest = destinations.claim_dir(
        args.out, flag="--out", command=COMMAND, overwrite=args.overwrite,
        inputs=[args.ckpt, args.data, args.tokenizer], recognise=_is_ict_dir)
    art = artifacts.inspect(args.ckpt, "checkpoint 'sft'")
    if art.is_ict:
        raise IctError(f"{args.ckpt} already has ICT heads; give the plain SFT model")
    tokenizer = art.tokenizer(args.tokenizer)
    exits = art.default_exits() if args.exits is None else soft.resolve_exits(
        args.exits, art.config.num_hidden_layers)
    recipe = IctRecipe.from_settings(
        art.settings, data=args.data, template=args.template, max_len=args.max_len,
        batch_size=args.batch_size, lr=args.lr, dtype=args.dtype, holdout=args.holdout,
        split=args.split, epochs=args.epochs, num_steps=args.num_steps,
        warmup_steps=args.warmup_steps, seed=args.seed, log_every=args.log_every)
    meta = train_ict_dir(dest, art, recipe, exits, tokenizer, sharding.parse_mesh(args.mesh))
    first, last = meta["history"][0], meta["history"][-1]
    print(f"wrote {args.out}: heads for exits {list(exits)}; train loss "
          f"{first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} "
          f"(step {last['step']})", flush=True)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("sorted_jax.ict", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
