"""HF PyTorch LLaMA <-> our Orbax model dir, and export of the depth-k sub-model.

    python -m sorted_jax.convert hf-to-orbax --hf HF_DIR_OR_GGUF --out MODEL_DIR [--dtype float32]
    python -m sorted_jax.convert orbax-to-hf --ckpt MODEL_DIR_OR_WORKDIR --out HF_DIR \
        [--exit-layer K] [--step N] [--dtype bfloat16] [--shard-size 2GB]
    python -m sorted_jax.convert orbax-to-hf --ckpt LORA_WORKDIR --out ADAPTER_DIR --peft

The command only parses flags; the work is in `sorted_jax.io`: `conversion` (both directions,
their output checks), `hf_checkpoint` + `hf_weights` (reading an HF dir tensor by tensor),
`hf_export` + `safetensors_shards` (writing one), `gguf_file` (a GGUF file read like an HF
dir). Every other command reads HF dirs and GGUF files directly too: converting is for users
who want the converted copy. Peak memory is about one copy of the model plus one tensor
(HF -> ours) or one stacked array (ours -> HF); a failed conversion leaves nothing at `--out`.
Torch is imported only for `.bin` inputs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sorted_jax.core.errors import UsageError, run_cli
from sorted_jax.io.conversion import hf_to_orbax, orbax_to_hf, orbax_to_peft


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sorted_jax.convert",
        description="Convert LLaMA weights between HF PyTorch (or GGUF) and sorted_jax model "
                    "dirs.")
    sub = parser.add_subparsers(dest="command", required=True)

    h2o = sub.add_parser("hf-to-orbax",
                         help="HF LLaMA dir or GGUF file -> model dir (Orbax params)")
    h2o.add_argument("--hf", required=True,
                     help="HF dir with config.json and weights, or a LLaMA .gguf file")
    h2o.add_argument("--out", required=True, help="model dir to create")
    h2o.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                     help="dtype of the stored params (default float32: fp32 master weights)")
    h2o.add_argument("--allow-pickle", action="store_true",
                     help="UNSAFE: load .bin files that are not weights-only (runs their code)")
    h2o.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    h2o.add_argument("--no-progress", action="store_true", help="no progress bar")

    o2h = sub.add_parser("orbax-to-hf", help="model dir or training workdir -> HF LLaMA dir")
    o2h.add_argument("--ckpt", required=True,
                     help="model dir or training workdir (or an HF dir / GGUF file)")
    o2h.add_argument("--out", required=True, help="HF dir to create")
    o2h.add_argument("--exit-layer", type=int, default=None,
                     help="export the sub-model of the first k layers (default: all)")
    o2h.add_argument("--step", type=int, default=None,
                     help="training step to export (workdirs only; default: latest)")
    o2h.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                     help="dtype of the written tensors (default: as stored)")
    o2h.add_argument("--shard-size", default="2GB",
                     help="max bytes per safetensors shard, e.g. 2GB, 500MB (default 2GB)")
    o2h.add_argument("--peft", action="store_true",
                     help="a LoRA run: write its adapters as an HF PEFT adapter dir (for the "
                          "base it started from) instead of the merged model")
    o2h.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    o2h.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "hf-to-orbax":
        out = hf_to_orbax(args.hf, args.out, args.dtype, args.allow_pickle, args.overwrite,
                          not args.no_progress)
    elif args.peft:
        if args.exit_layer is not None:
            raise UsageError("--peft writes the adapters of the whole base; --exit-layer applies "
                             "to the merged export (drop --peft)")
        out = orbax_to_peft(args.ckpt, args.out, args.step, args.dtype, args.overwrite)
    else:
        out = orbax_to_hf(args.ckpt, args.out, args.exit_layer, args.step, args.dtype,
                          args.shard_size, args.overwrite, not args.no_progress)
    print(f"wrote {out}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(f"sorted_jax.convert {args.command}", run, args)


if __name__ == "__main__":
    sys.exit(main())
