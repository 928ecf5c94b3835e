"""`python -m sorted_jax.evaluate`: per-exit quality of checkpoints side by side; `pair`.

    python -m sorted_jax.evaluate --ckpt /tmp/soft_tiny --ckpt /tmp/sft_tiny \\
        --ckpt /tmp/sft_ict --data builtin --out /tmp/eval [--latency] [--triviaqa FILE.json]
    python -m sorted_jax.evaluate --ckpt soft --data builtin --out ev \\
        --dump-generations gens.jsonl --num-generations 20
    python -m sorted_jax.evaluate pair --gens gens.jsonl --a soft:4 --b sft:8 --out pairs.jsonl
    python -m sorted_jax.evaluate lm-eval --ckpt RUN --exits 8,16,24,32 --tasks hellaswag \\
        [--limit N --num-fewshot K --include-path DIR --batch-size B --out DIR]

The flags become an `EvalOptions`; `evaluation.evaluator` says what is measured and which
files it writes. `pair` joins two columns (LABEL:EXIT) of a `--dump-generations` file into a
pairwise judge's {instruction, input, response1, response2} (`evaluation.pairs`). `lm-eval`
runs lm-evaluation-harness tasks at each exit (`evaluation.harness`; the `lm-eval` extra).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from sorted_jax.core.errors import run_cli
from sorted_jax.data import TEMPLATE_NAMES, TEMPLATES
from sorted_jax.evaluation import pairs
from sorted_jax.evaluation.evaluator import EvalOptions, evaluate
from sorted_jax.evaluation.harness import LmEvalOptions, run_lm_eval


def build_parser() -> argparse.ArgumentParser:
    # A flag left out is absent from the namespace, so `EvalOptions` holds every default.
    p = argparse.ArgumentParser(
        prog="python -m sorted_jax.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        description="Per-exit loss / perplexity / token accuracy of checkpoints side by side "
                    "(also: TriviaQA EM, decode latency, generation dumps).",
        epilog="Pair two columns of a generation dump for a pairwise judge: python -m "
               "sorted_jax.evaluate pair --help\nlm-evaluation-harness tasks at each exit: "
               "python -m sorted_jax.evaluate lm-eval --help")
    p.add_argument("--ckpt", action="append", required=True,
                   help="model dir, training workdir or SFT+ICT dir; repeat to compare")
    p.add_argument("--label", action="append",
                   help="name of each --ckpt in the table (default: the dir name)")
    p.add_argument("--data", required=True, help="builtin, tfds:NAME or a JSON/JSONL file")
    p.add_argument("--split", help="split of builtin/tfds data (default eval)")
    p.add_argument("--holdout", type=int,
                   help="JSON data: records the run held out (default: its data.eval_holdout "
                        "when --data is its training data); --split eval = those")
    p.add_argument("--limit", type=int, help="use only the first N records")
    p.add_argument("--exits", help="exit layers, e.g. 2,4,6,8 or all (default: the run's exits)")
    p.add_argument("--template", choices=sorted(TEMPLATE_NAMES),
                   help="prompt template (default: the training run's, else alpaca)")
    p.add_argument("--tokenizer",
                   help="tokenizer spec for every checkpoint (default: each checkpoint's own)")
    p.add_argument("--max-len", type=int,
                   help="tokens per sequence (default: the training run's, else 512 or the "
                        "model's context if shorter)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (default: the training run's, else float32)")
    p.add_argument("--mesh", help="mesh shape data,fsdp,tensor")
    p.add_argument("--out", help="output dir")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of evaluate at --out / --dump-generations")
    p.add_argument("--latency", action="store_true",
                   help="measure decode ms/token per exit and plot speed vs quality")
    p.add_argument("--latency-tokens", type=int,
                   help="new tokens per timed generation (--latency)")
    p.add_argument("--dump-generations", metavar="FILE.jsonl",
                   help="write responses per (instruction, exit, checkpoint)")
    p.add_argument("--num-generations", type=int,
                   help="instructions for --dump-generations (the first N records)")
    p.add_argument("--max-new-tokens", type=int, help="generation length for --dump-generations")
    p.add_argument("--gen-batch-size", type=int)
    p.add_argument("--triviaqa", metavar="FILE.json",
                   help="official-format TriviaQA file: closed-book EM per exit")
    p.add_argument("--triviaqa-limit", type=int, help="first N questions only")
    p.add_argument("--triviaqa-max-new-tokens", type=int)
    p.add_argument("--triviaqa-template", choices=["raw", *sorted(TEMPLATES)],
                   help="raw = 'Question: ...\\nAnswer:' alone; else wrapped as an instruction")
    return p


def build_pair_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sorted_jax.evaluate pair",
        description="Judge input {instruction, input, response1, response2} (PandaLM style) "
                    "for 'exit a of model X vs exit b of model Y' from a --dump-generations "
                    "file.")
    p.add_argument("--gens", required=True, help="JSONL from --dump-generations")
    p.add_argument("--a", required=True, help="LABEL:EXIT of response1, e.g. soft:4")
    p.add_argument("--b", required=True, help="LABEL:EXIT of response2, e.g. sft:8")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of evaluate pair at --out")
    return p


def build_lm_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sorted_jax.evaluate lm-eval", argument_default=argparse.SUPPRESS,
        description="lm-evaluation-harness tasks at each exit of a checkpoint: one table "
                    "(task x exit, with the harness's stderr) and the harness's JSON per exit. "
                    'Needs the lm-eval extra: pip install -e ".[lm-eval]".')
    p.add_argument("--ckpt", required=True, help="model dir, training workdir or SFT+ICT dir")
    p.add_argument("--tasks", required=True, help="comma-separated harness task names or YAMLs")
    p.add_argument("--exits", help="exit layers, e.g. 8,16,24,32 (default: the run's exits); "
                                   "draft depths with --mode speculative")
    p.add_argument("--mode", choices=["fixed", "early-exit", "speculative"],
                   help="fixed: a column per exit (default); early-exit: one column over "
                        "--exits; speculative: full-model scores, drafts of depth k per column")
    p.add_argument("--thresholds", type=float, nargs="+", help="--mode early-exit thresholds")
    p.add_argument("--limit", type=float, help="first N docs per task (below 1: a fraction)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--include-path", help="dir of extra task YAMLs (e.g. local JSON tasks)")
    p.add_argument("--batch-size", type=int, help="rows per forward / decode batch (8)")
    p.add_argument("--max-gen-toks", type=int, help="default generation budget (256)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--tokenizer", help="tokenizer spec (default: the checkpoint's own)")
    p.add_argument("--seed", type=int)
    p.add_argument("--bootstrap-iters", type=int)
    p.add_argument("--log-samples", action="store_true", help="also write every request")
    p.add_argument("--out", help="output dir (default lm_eval_out)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output at --out")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    return evaluate(EvalOptions(**vars(args)))


def run_pair(args: argparse.Namespace) -> None:
    pairs.write_pairs(args.gens, args.a, args.b, args.out, overwrite=args.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "pair":
        args = build_pair_parser().parse_args(argv[1:])
        return run_cli("sorted_jax.evaluate pair", run_pair, args)
    if argv and argv[0] == "lm-eval":
        args = build_lm_eval_parser().parse_args(argv[1:])
        return run_cli("sorted_jax.evaluate lm-eval",
                       lambda a: run_lm_eval(LmEvalOptions(**vars(a))), args)
    return run_cli("sorted_jax.evaluate", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
