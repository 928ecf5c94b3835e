"""Per-exit quality of one or several checkpoints, side by side; TriviaQA EM; latency; dumps.

    python -m sorted_jax.evaluate --ckpt /tmp/soft_tiny --ckpt /tmp/sft_tiny \\
        --ckpt /tmp/sft_ict --data builtin --out /tmp/eval [--latency] [--triviaqa FILE.json]
    python -m sorted_jax.evaluate --ckpt soft --data builtin --out ev \\
        --dump-generations gens.jsonl --num-generations 20
    python -m sorted_jax.evaluate pair --gens gens.jsonl --a soft:4 --b sft:8 --out pairs.jsonl

`--ckpt` is a model dir or a training workdir (`model_io.load_params`), or an SFT+ICT dir
(`python -m sorted_jax.ict`), whose exits are then scored with their own heads. Per exit n
(first n layers + final norm + lm_head) on the held-out records of `--data` (`--split`,
default eval) with the training template: token cross-entropy, perplexity and top-1 token
accuracy on the response tokens, computed by `SoftSteps.eval_step` (the training eval's own
jitted step) and summed over the whole set before dividing, as training's eval does.

Outputs in `--out`:

    exit_metrics.md     Markdown table, one row per exit, columns checkpoint x metric
    exit_metrics.json   the same numbers, plus settings; TriviaQA predictions per exit
    exit_quality.png    loss / token accuracy (/ TriviaQA EM) vs exit, one line per checkpoint
    speed_quality.png   with --latency: loss vs measured decode ms/token, one point per exit

`--latency` times greedy decoding at each exit (`Decoder`, mode fixed): after a warm-up,
(time of N new tokens - time of 1) / (N - 1), the best of a few repeats, batch 1, so prefill
and compilation are excluded. `--dump-generations` writes one JSON line per (instruction,
exit, checkpoint) with {instruction, input, response} as a PandaLM-style judge reads them;
`pair` turns two of those columns into the judge's {instruction, input, response1, response2}.

Defaults (template, max_len, exits, data seed, held-out records of a JSON file, compute dtype)
come from the first checkpoint's `train_config.json` (or `ict.json`) when it has one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax import ict, model_io, pairs, sharding, soft
from sorted_jax.config import LlamaConfig
from sorted_jax.data import (
    EvalIterator,
    SourceError,
    holdout_split,
    load_tokenizer,
    open_records,
    tokenize_records,
)
from sorted_jax.data.templates import TEMPLATES, format_prompt
from sorted_jax.errors import EvalError, run_cli
from sorted_jax.modeling import DTYPES

METRICS_MD, METRICS_JSON = "exit_metrics.md", "exit_metrics.json"
QUALITY_PNG, SPEED_PNG = "exit_quality.png", "speed_quality.png"


# ---------------------------------------------------------------------------------------------
# checkpoints


@dataclasses.dataclass
class Checkpoint:
    """One `--ckpt`: config, tokenizer and settings at once; weights on `load()`.

    Several checkpoints are validated together before any weights are read, and evaluated one
    after the other, so only one model's weights are in host memory at a time.
    """

    label: str
    path: Path
    config: LlamaConfig
    tokenizer: Any
    settings: dict[str, Any]  # what training recorded: template, max_len, exits, data, ...
    head_exits: tuple[int, ...] | None  # exits with an SFT+ICT head, None for a plain model
    params: dict | None = None
    heads: ict.IctHeads | None = None
    # Decoders built from the loaded weights, reused by latency, generations and TriviaQA: one
    # per dtype (any exit runs through it), or per (exit, dtype) for SFT+ICT's per-exit heads.
    decoders: dict[tuple[int | None, str], Any] = dataclasses.field(default_factory=dict)

    @property
    def is_ict(self) -> bool:
        return self.head_exits is not None

    def load(self) -> Checkpoint:
        if self.params is None:
            self.params, config, _ = model_io.load_params(self.path)
            if config != self.config:
                raise EvalError(f"{self.path}: config.json changed while evaluating")
            self.heads = ict.load_heads(self.path, self.config) if self.is_ict else None
        return self

    def unload(self) -> None:
        self.params, self.heads = None, None
        self.decoders.clear()


def _parse_int_list(text: Any) -> list[int] | None:
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, list | tuple):
        return [int(x) for x in text]
    try:
        return [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        return None


def read_settings(path: Path) -> dict[str, Any]:
    """Training settings recorded beside the weights (train_config.json or ict.json)."""
    meta = ict.read_meta(path)
    if meta:
        keys = ("data", "template", "max_len", "batch_size", "lr", "dtype", "holdout",
                "data_seed", "buckets", "exits")
        out = {k: meta[k] for k in keys if k in meta}
        out["eval_holdout"] = meta.get("holdout", 0)
        return out
    f = path / "train_config.json"
    if not f.is_file():
        return {}
    try:
        c = json.loads(f.read_text())
        data = c.get("data", {})
        return {
            "data": data.get("train"), "template": data.get("template"),
            "max_len": c.get("max_len"), "batch_size": c.get("batch_size"),
            "lr": c.get("optim", {}).get("lr"), "dtype": c.get("dtype"),
            "eval_holdout": data.get("eval_holdout", 0), "data_seed": data.get("seed", 0),
            "buckets": _parse_int_list(data.get("buckets")),
            "train_exits": c.get("exits"), "eval_exits": c.get("eval_exits"),
            "tokenizer": data.get("tokenizer"),
        }
    except (json.JSONDecodeError, AttributeError):
        return {}


def _resolve_tokenizer(path: Path, spec: str | None, settings: Mapping[str, Any]) -> Any:
    if spec:
        return load_tokenizer(spec)
    found = model_io.find_tokenizer_dir(path)
    if found is not None:
        return load_tokenizer(found)
    if settings.get("tokenizer") == "builtin":
        return load_tokenizer("builtin")
    candidates = [path, path / "tokenizer"]
    raise EvalError(f"{path} has no tokenizer files (looked in {[str(c) for c in candidates]}); "
                    "pass --tokenizer (builtin, a tokenizer.model or a tokenizer dir)")


def load_checkpoint(path: str | Path, label: str, tokenizer_spec: str | None = None,
                    load_weights: bool = True) -> Checkpoint:
    """Config, tokenizer, training settings (and with `load_weights` the weights and ICT heads)
    of a model dir, training workdir or SFT+ICT dir."""
    p = model_io.require_filesystem_path(path, f"checkpoint {label!r}")
    if not p.exists():
        raise EvalError(f"checkpoint {label!r}: {p} does not exist")
    if p.is_dir() and not (p / model_io.CONFIG_FILE).is_file():
        has = sorted(x.name for x in p.iterdir())[:12]
        raise EvalError(f"checkpoint {label!r} ({p}) has no {model_io.CONFIG_FILE}: it is not a "
                        f"model dir or training workdir (it contains {has})")
    if not (model_io.is_model_dir(p) or model_io.is_workdir(p)):
        raise EvalError(f"checkpoint {label!r} ({p}) is neither a model dir "
                        f"({model_io.CONFIG_FILE} + {model_io.PARAMS_DIR}/) nor a training "
                        f"workdir ({model_io.CONFIG_FILE} + {model_io.CHECKPOINTS_DIR}/)")
    config = model_io.load_config(p)
    settings = read_settings(p)
    tokenizer = _resolve_tokenizer(p, tokenizer_spec, settings)
    if tokenizer.vocab_size > config.vocab_size:
        raise EvalError(f"checkpoint {label!r}: the tokenizer has {tokenizer.vocab_size} ids but "
                        f"the model's vocab is {config.vocab_size}; pass the right --tokenizer")
    ckpt = Checkpoint(label, p, config, tokenizer, settings, ict.head_exits(p))
    return ckpt.load() if load_weights else ckpt


def default_exits_of(ckpt: Checkpoint) -> tuple[int, ...]:
    """ICT heads' exits; else the run's eval/train exits (unless just the last); else default."""
    big_l = ckpt.config.num_hidden_layers
    if ckpt.head_exits is not None:
        return ckpt.head_exits
    for key in ("eval_exits", "train_exits"):
        text = ckpt.settings.get(key)
        if text and str(text).strip():
            try:
                exits = soft.resolve_exits(str(text), big_l)
            except soft.ExitError:
                continue
            if exits != (big_l,):
                return exits
    return soft.default_exits(big_l)


def resolve_exits_for(ckpt: Checkpoint, exits: str | None) -> tuple[int, ...]:
    if exits is None:
        out = default_exits_of(ckpt)
    else:
        try:
            out = soft.resolve_exits(exits, ckpt.config.num_hidden_layers)
        except soft.ExitError as e:
            raise EvalError(f"--exits {exits} for checkpoint {ckpt.label!r} ({ckpt.path}, "
                            f"{ckpt.config.num_hidden_layers} layers): {e}") from None
    if ckpt.head_exits is not None:
        missing = [e for e in out if e not in ckpt.head_exits]
        if missing:
            raise EvalError(f"checkpoint {ckpt.label!r} is SFT+ICT with heads for exits "
                            f"{list(ckpt.head_exits)} only; no head for exits {missing}")
    return out


# ---------------------------------------------------------------------------------------------
# data


def load_split_records(spec: str, split: str, *, holdout: int = 0, seed: int = 0,
                       limit: int = 0) -> list:
    """Records of `spec`; for a JSON file with `holdout` > 0 the held-out (eval) part or the
    rest (train), split as training's `data.eval_holdout` does."""
    try:
        records = open_records(spec, split, seed=seed)
    except SourceError as e:
        raise EvalError(f"--data {e}") from None
    is_file = spec != "builtin" and not spec.startswith("tfds:")
    if is_file and holdout > 0:
        try:
            train, held = holdout_split(records, holdout, seed)
        except ValueError as e:
            raise EvalError(f"--holdout {holdout}: {e}") from None
        records = held if split == "eval" else train
    return records[:limit] if limit else records


def parse_mesh(text: str) -> Any:
    try:
        shape = [int(x) for x in text.split(",")]
    except ValueError:
        raise EvalError(f"--mesh must be three integers data,fsdp,tensor, got {text!r}") from None
    devices = jax.devices()
    if len(shape) == 3 and -1 not in shape and math.prod(shape) < len(devices):
        devices = devices[:math.prod(shape)]
    return sharding.make_mesh(shape, devices)


# ---------------------------------------------------------------------------------------------
# per-exit loss / accuracy


def exit_quality(ckpt: Checkpoint, records: Sequence, exits: Sequence[int], *, template: str,
                 max_len: int, batch_size: int, mesh: Any, dtype: Any = jnp.float32,
                 buckets: Sequence[int] | None = None) -> dict[str, Any]:
    """{"exits": {n: {loss, perplexity, accuracy}}, "examples", "tokens"} on `records`."""
    import optax

    from sorted_jax.modeling import make_model
    from sorted_jax.train_step import SoftSteps, sum_exit_sums

    ckpt.load()
    ds = tokenize_records(records, ckpt.tokenizer, max_len, template)
    if len(ds) == 0:
        raise EvalError(f"no record fits --max-len {max_len} (every prompt is too long)")
    model = make_model(ckpt.config, dtype=dtype, attention_impl="auto")
    dp = sharding.data_parallel_size(mesh)
    batch_size = -(-batch_size // dp) * dp
    it = EvalIterator(ds, batch_size, buckets=buckets)
    steps = SoftSteps(model, exits, optax.identity(), mesh)
    params = jax.device_put(ckpt.params, steps.params_shardings)
    if ckpt.heads is not None:
        heads_eval = ict.HeadsEval(model, exits, mesh)
        sel = ckpt.heads.select(exits)
        heads = jax.device_put({k: jnp.asarray(v) for k, v in sel.tree().items()},
                               ict.heads_shardings(mesh, sharding.DEFAULT_RULES, sel))

        def eval_step(batch):
            return heads_eval.eval_step(params, heads, batch)
    else:
        def eval_step(batch):
            return steps.eval_step(params, batch)
    total = sum_exit_sums(eval_step, it, steps.batch_shardings)
    m = {k: float(v) for k, v in jax.device_get(soft.exit_metrics(total, exits)).items()}
    per = {}
    for e in exits:
        loss = m[f"loss/exit_{e}"]
        per[e] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                  "accuracy": m[f"accuracy/exit_{e}"]}
    return {"exits": per, "examples": len(ds), "tokens": int(m["tokens"]),
            "dropped": ds.num_dropped, "truncated": ds.num_truncated}


# ---------------------------------------------------------------------------------------------
# decoding at each exit: latency, generations, TriviaQA


def exit_decoder(ckpt: Checkpoint, exit_layer: int, dtype: Any) -> Any:
    from sorted_jax.decoding import Decoder

    key = (exit_layer if ckpt.is_ict else None, jnp.dtype(dtype).name)
    if key not in ckpt.decoders:
        ckpt.load()
        params, config = ict.exit_model(ckpt.params, ckpt.config, ckpt.heads, exit_layer)
        ckpt.decoders[key] = Decoder(params, config, dtype=dtype, pad_multiple=32)
    return ckpt.decoders[key]


def _cache_len(prompts: Sequence[Sequence[int]], new_tokens: int) -> int:
    longest = max(len(p) for p in prompts)
    return -(-longest // 32) * 32 + -(-new_tokens // 32) * 32


def measure_latency(ckpt: Checkpoint, exits: Sequence[int], prompt: Sequence[int], *,
                    new_tokens: int = 32, repeats: int = 5, dtype: Any = jnp.float32
                    ) -> dict[int, float]:
    """{exit: decode ms per token}, batch 1, greedy, prefill and compilation excluded."""
    new_tokens = max(2, new_tokens)
    out = {}
    slots = _cache_len([prompt], new_tokens)
    for e in exits:
        dec = exit_decoder(ckpt, e, dtype)
        kw = dict(mode="fixed", exit_layer=e, eos_id=[], max_len=slots)

        def timed(n: int, dec=dec, kw=kw) -> float:
            t0 = time.perf_counter()
            dec.generate([list(prompt)], max_new_tokens=n, **kw)
            return time.perf_counter() - t0

        timed(new_tokens)  # compile prefill + loop
        short, long = [], []
        for _ in range(repeats):  # interleaved, so load changes hit both alike
            short.append(timed(1))
            long.append(timed(new_tokens))
        per_token = (min(long) - min(short)) / (new_tokens - 1)
        if per_token <= 0:  # timer noise outweighs a few tokens' work: whole-run mean instead
            per_token = min(long) / new_tokens
        out[e] = per_token * 1000.0
    return out


def generate_at_exit(ckpt: Checkpoint, exit_layer: int, prompts: Sequence[Sequence[int]], *,
                     max_new_tokens: int, batch_size: int, stop_ids: Sequence[int],
                     dtype: Any = jnp.float32) -> list[list[int] | None]:
    """Greedy continuations (stop id stripped) of every prompt at one exit; None for a prompt
    that leaves no room for `max_new_tokens` in the model's context."""
    dec = exit_decoder(ckpt, exit_layer, dtype)
    room = ckpt.config.max_position_embeddings - max_new_tokens
    fits = [i for i, p in enumerate(prompts) if len(p) <= room]
    out: list[list[int] | None] = [None] * len(prompts)
    if not fits:
        return out
    slots = _cache_len([prompts[i] for i in fits], max_new_tokens)
    stops = set(stop_ids)
    for start in range(0, len(fits), batch_size):
        idx = fits[start:start + batch_size]
        chunk = [list(prompts[i]) for i in idx]
        chunk += [chunk[0]] * (batch_size - len(idx))  # one batch shape: one compiled program
        res = dec.generate(chunk, mode="fixed", exit_layer=exit_layer,
                           max_new_tokens=max_new_tokens, eos_id=list(stop_ids), max_len=slots)
        for i, toks in zip(idx, res.tokens, strict=False):
            out[i] = toks[:-1] if toks and toks[-1] in stops else toks
    return out


def dump_generations(ckpt: Checkpoint, exits: Sequence[int], records: Sequence, f: Any, *,
                     template: str, max_new_tokens: int, batch_size: int, dtype: Any) -> int:
    """Write one JSON line per (instruction, exit) of `ckpt` to `f`; returns the count."""
    tok = ckpt.tokenizer
    prompts = [[tok.bos_id, *tok.encode(format_prompt(r["instruction"], r.get("input", ""),
                                                      template))] for r in records]
    n = 0
    for e in exits:
        outs = generate_at_exit(ckpt, e, prompts, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, stop_ids=[tok.eos_id], dtype=dtype)
        for i, (r, toks) in enumerate(zip(records, outs, strict=True)):
            line = {"id": i, "label": ckpt.label, "exit": e,
                    "num_layers": ckpt.config.num_hidden_layers, "checkpoint": str(ckpt.path),
                    "ict_head": ckpt.is_ict, "instruction": r["instruction"],
                    "input": r.get("input", ""),
                    "response": "" if toks is None else tok.decode(toks),
                    "reference": r.get("output", ""),
                    "finished": toks is not None and len(toks) < max_new_tokens}
            if toks is None:  # the prompt does not fit the model's context
                line["skipped"] = True
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            n += 1
    f.flush()
    return n


def triviaqa_em(ckpt: Checkpoint, exits: Sequence[int], items: Sequence, *,
                max_new_tokens: int, batch_size: int, dtype: Any,
                template: str | None = None) -> dict[int, dict[str, Any]]:
    """{exit: {"em", "num_questions", "predictions"}} with greedy answers cut at a newline."""
    from sorted_jax import triviaqa

    tok = ckpt.tokenizer
    stops = [tok.eos_id, *triviaqa.newline_stop_ids(tok)]
    out = {}
    for e in exits:
        def gen(prompts, e=e):
            return generate_at_exit(ckpt, e, prompts, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, stop_ids=stops, dtype=dtype)

        out[e] = triviaqa.evaluate_generations(gen, tok, items, batch_size=len(items),
                                               template=template)
    return out


# ---------------------------------------------------------------------------------------------
# report


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


COLUMNS = (("loss", "loss", ".4f"), ("perplexity", "ppl", ".3f"), ("accuracy", "acc", ".4f"),
           ("triviaqa_em", "TQA EM", ".3f"), ("ms_per_token", "ms/tok", ".3f"))


def metrics_table(results: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """Markdown: one row per exit, columns checkpoint x metric."""
    exits = sorted({int(e) for r in results for e in r["exits"]})
    cols = [(r, key, name, spec) for r in results for key, name, spec in COLUMNS
            if any(key in v for v in r["exits"].values())]
    lines = [f"{title}\n" if title else ""]
    lines.append("| exit | " + " | ".join(f"{r['label']} {name}" for r, _, name, _ in cols)
                 + " |")
    lines.append("|---:|" + "---:|" * len(cols))
    for e in exits:
        cells = []
        for r, key, _, spec in cols:
            v = r["exits"].get(e, r["exits"].get(str(e), {})).get(key)
            cells.append(_fmt(v, spec))
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(x for x in lines if x) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality(results: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Loss, token accuracy (and TriviaQA EM) vs exit layer, one line per checkpoint."""
    plt = _plt()
    panels = [("loss", "cross-entropy (nats / token)"), ("accuracy", "token accuracy")]
    if any("triviaqa_em" in v for r in results for v in r["exits"].values()):
        panels.append(("triviaqa_em", "TriviaQA exact match"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), dpi=100)
    for ax, (key, ylabel) in zip(np.atleast_1d(axes), panels, strict=True):
        for r in results:
            pts = sorted((int(e), v[key]) for e, v in r["exits"].items() if key in v)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=r["label"])
        ax.set_xlabel("exit layer (sub-model depth)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("held-out quality per exit")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_speed(results: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Loss vs measured decode latency, one point per exit (labelled), one line per ckpt."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=100)
    for r in results:
        pts = [(v["ms_per_token"], v["loss"], int(e)) for e, v in sorted(
            r["exits"].items(), key=lambda kv: int(kv[0])) if "ms_per_token" in v]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=r["label"])
        for x, y, e in pts:
            ax.annotate(str(e), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("decode latency (ms / token, batch 1, greedy)")
    ax.set_ylabel("held-out cross-entropy (nats / token)")
    ax.set_title("speed vs quality (points = exit layers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sorted_jax.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per-exit loss / perplexity / token accuracy of checkpoints side by side "
                    "(also: TriviaQA EM, decode latency, generation dumps).",
        epilog="Pair two columns of a generation dump for a pairwise judge:\n"
               "  python -m sorted_jax.evaluate pair --gens G.jsonl --a soft:4 --b sft:8 "
               "--out P.jsonl")
    p.add_argument("--ckpt", action="append", required=True,
                   help="model dir, training workdir or SFT+ICT dir; repeat to compare")
    p.add_argument("--label", action="append", default=None,
                   help="name of each --ckpt in the table (default: the dir name)")
    p.add_argument("--data", required=True, help="builtin, tfds:NAME or a JSON/JSONL file")
    p.add_argument("--split", default="eval", help="split of builtin/tfds data (default eval)")
    p.add_argument("--holdout", type=int, default=None,
                   help="JSON data: records the run held out (default: its data.eval_holdout "
                        "when --data is its training data); --split eval = those")
    p.add_argument("--limit", type=int, default=0, help="use only the first N records")
    p.add_argument("--exits", default=None,
                   help="exit layers, e.g. 2,4,6,8 or all (default: the run's exits)")
    p.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                   help="prompt template (default: the training run's, else alpaca)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer spec for every checkpoint (default: each checkpoint's own)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens per sequence (default: the training run's, else 512 or the "
                        "model's context if shorter)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype (default: the training run's, else float32)")
    p.add_argument("--mesh", default="1,-1,1", help="mesh shape data,fsdp,tensor")
    p.add_argument("--out", default="eval_out", help="output dir")
    p.add_argument("--latency", action="store_true",
                   help="measure decode ms/token per exit and plot speed vs quality")
    p.add_argument("--latency-tokens", type=int, default=64,
                   help="new tokens per timed generation (--latency)")
    p.add_argument("--dump-generations", default=None, metavar="FILE.jsonl",
                   help="write responses per (instruction, exit, checkpoint)")
    p.add_argument("--num-generations", type=int, default=20,
                   help="instructions for --dump-generations (the first N records)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="generation length for --dump-generations")
    p.add_argument("--gen-batch-size", type=int, default=8)
    p.add_argument("--triviaqa", default=None, metavar="FILE.json",
                   help="official-format TriviaQA file: closed-book EM per exit")
    p.add_argument("--triviaqa-limit", type=int, default=0, help="first N questions only")
    p.add_argument("--triviaqa-max-new-tokens", type=int, default=24)
    p.add_argument("--triviaqa-template", default="raw", choices=["raw", *sorted(TEMPLATES)],
                   help="raw = 'Question: ...\\nAnswer:' alone; else wrapped as an instruction")
    return p


def _labels(paths: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(paths):
            raise EvalError(f"{len(labels)} --label for {len(paths)} --ckpt: give one per "
                            "checkpoint, in the same order")
        out = list(labels)
    else:
        out = [Path(p).absolute().name or str(p) for p in paths]
        for i, name in enumerate(out):
            if out.count(name) > 1:
                out[i] = f"{name}#{i + 1}"
    if len(set(out)) != len(out):
        raise EvalError(f"labels repeat: {out}")
    bad = [x for x in out if ":" in x]
    if bad:
        raise EvalError(f"labels may not contain ':' (the pair helper uses LABEL:EXIT): {bad}")
    return out


def _evaluate_one(c: Checkpoint, args: argparse.Namespace, records: Sequence,
                  items: Sequence | None, exits: Sequence[int], *, template: str, max_len: int,
                  mesh: Any, dtype: Any, buckets: Sequence[int] | None,
                  gens_file: Any) -> dict[str, Any]:
    """Everything `run` reports for one checkpoint; its weights are dropped at the end."""
    t0 = time.time()
    c.load()
    print(f"loaded {c.label}: {c.path} ({c.config.num_hidden_layers} layers"
          + (", SFT+ICT heads" if c.is_ict else "") + f", {time.time() - t0:.1f}s)", flush=True)
    q = exit_quality(c, records, exits, template=template, max_len=max_len,
                     batch_size=args.batch_size, mesh=mesh, dtype=dtype, buckets=buckets)
    res: dict[str, Any] = {"label": c.label, "path": str(c.path),
                           "num_layers": c.config.num_hidden_layers,
                           "ict_heads": c.is_ict, "examples": q["examples"],
                           "tokens": q["tokens"], "exits": q["exits"]}
    print(f"{c.label}: " + " ".join(f"e{e} {v['loss']:.4f}" for e, v in q["exits"].items())
          + f" ({q['examples']} examples, {time.time() - t0:.1f}s)", flush=True)
    if items is not None:
        tq = triviaqa_em(c, exits, items,
                         max_new_tokens=args.triviaqa_max_new_tokens,
                         batch_size=args.gen_batch_size, dtype=dtype,
                         template=args.triviaqa_template)
        res["triviaqa"] = {str(e): v for e, v in tq.items()}
        for e, v in tq.items():
            res["exits"][e]["triviaqa_em"] = v["em"]
    if args.latency:
        tok = c.tokenizer
        r0 = records[0]
        prompt = [tok.bos_id, *tok.encode(format_prompt(r0["instruction"],
                                                        r0.get("input", ""), template))]
        for e, ms in measure_latency(c, exits, prompt,
                                     new_tokens=args.latency_tokens, dtype=dtype).items():
            res["exits"][e]["ms_per_token"] = ms
    if gens_file is not None:
        res["generations"] = dump_generations(c, exits, records[:args.num_generations], gens_file,
                         template=template, max_new_tokens=args.max_new_tokens,
                         batch_size=args.gen_batch_size, dtype=dtype)
    c.unload()
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    labels = _labels(args.ckpt, args.label)
    for flag in ("batch_size", "max_new_tokens", "gen_batch_size", "latency_tokens"):
        if getattr(args, flag) < 1:
            raise EvalError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.triviaqa and not Path(args.triviaqa).is_file():
        raise EvalError(f"--triviaqa file {args.triviaqa!r} not found")
    ckpts = []
    for path, label in zip(args.ckpt, labels, strict=True):
        ckpts.append(load_checkpoint(path, label, args.tokenizer, load_weights=False))
    first = ckpts[0].settings
    template = args.template or first.get("template") or "alpaca"
    max_len = args.max_len or first.get("max_len") or min(
        [512, *(c.config.max_position_embeddings for c in ckpts)])
    dtype_name = args.dtype or first.get("dtype") or "float32"
    dtype = DTYPES[dtype_name]
    seed = int(first.get("data_seed") or 0)
    holdout = args.holdout if args.holdout is not None else (
        int(first.get("eval_holdout") or 0) if args.data == first.get("data") else 0)
    if args.exits is None:  # the first checkpoint's exits, for every checkpoint
        exits_arg = ",".join(map(str, default_exits_of(ckpts[0])))
    else:
        exits_arg = args.exits
    exits_of = {c.label: resolve_exits_for(c, exits_arg) for c in ckpts}
    for c in ckpts:
        if max_len > c.config.max_position_embeddings:
            raise EvalError(f"--max-len {max_len} exceeds checkpoint {c.label!r}'s "
                            f"max_position_embeddings={c.config.max_position_embeddings}")
    records = load_split_records(args.data, args.split, holdout=holdout, seed=seed,
                                 limit=args.limit)
    items = None
    if args.triviaqa:
        from sorted_jax.triviaqa import load_triviaqa

        items = load_triviaqa(args.triviaqa, limit=args.triviaqa_limit or None)
    mesh = parse_mesh(args.mesh)
    buckets = first.get("buckets")
    if buckets and max(buckets) < max_len:
        buckets = None
    out_dir = model_io.require_filesystem_path(args.out, "--out")
    out_dir.mkdir(parents=True, exist_ok=True)

    gens_file = None
    if args.dump_generations:
        Path(args.dump_generations).parent.mkdir(parents=True, exist_ok=True)
        gens_file = open(args.dump_generations, "w", encoding="utf-8")  # noqa: SIM115
    try:
        results = [_evaluate_one(c, args, records, items, exits_of[c.label], template=template,
                                 max_len=max_len, mesh=mesh, dtype=dtype, buckets=buckets,
                                 gens_file=gens_file) for c in ckpts]
    finally:
        if gens_file is not None:
            gens_file.close()

    held = f", {holdout} held out" if holdout else ""
    title = (f"Per-exit held-out metrics on {args.data} ({args.split}{held}; "
             f"{results[0]['examples']} "
             f"examples, template {template}, max_len {max_len}; loss = nats/token on response "
             "tokens, acc = top-1 token accuracy)")
    table = metrics_table(results, title)
    (out_dir / METRICS_MD).write_text(table)
    summary = {"data": args.data, "split": args.split, "holdout": holdout, "data_seed": seed,
               "limit": args.limit, "template": template, "max_len": max_len,
               "dtype": dtype_name, "triviaqa": args.triviaqa,
               "checkpoints": [{**r, "exits": {str(e): v for e, v in r["exits"].items()}}
                               for r in results]}
    (out_dir / METRICS_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    plot_quality(results, out_dir / QUALITY_PNG)
    written = [out_dir / METRICS_MD, out_dir / METRICS_JSON, out_dir / QUALITY_PNG]
    if args.latency:
        plot_speed(results, out_dir / SPEED_PNG)
        written.append(out_dir / SPEED_PNG)
    if args.dump_generations:
        n = sum(r["generations"] for r in results)
        print(f"wrote {n} generations (instruction x exit x checkpoint) to "
              f"{args.dump_generations}", flush=True)
    print("\n" + table, flush=True)
    print("wrote " + ", ".join(str(w) for w in written), flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "pair":
        return pairs.main(argv[1:])
    return run_cli("sorted_jax.evaluate", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
