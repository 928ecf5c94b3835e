"""The evaluator: per-exit quality of one or several checkpoints, side by side.

`evaluate(EvalOptions(...))` is `python -m sorted_jax.evaluate` without the command line.

A checkpoint is a model dir, a training workdir (`artifacts.inspect` reads any) or an SFT+ICT
dir (`python -m sorted_jax.ict`), whose exits are then scored with their own heads. Per exit n
(first n layers + final norm + lm_head) on the held-out records of `data` (`split`, default
eval) with the training template: token cross-entropy, perplexity and top-1 token accuracy on
the response tokens, computed by `SoftSteps.eval_step` (the training eval's own jitted step)
and summed over the whole set before dividing, as training's eval does.

Outputs in `out`:

    exit_metrics.md     Markdown table, one row per exit, columns checkpoint x metric
    exit_metrics.json   the same numbers, plus settings; TriviaQA predictions per exit
    exit_quality.png    loss / token accuracy (/ TriviaQA EM) vs exit, one line per checkpoint
    speed_quality.png   with latency: loss vs measured decode ms/token, one point per exit

`out` (and `dump_generations`) are checked before anything is read: new or empty, never an
input, and an earlier evaluate output is replaced (atomically) only with `overwrite`.

`latency` times greedy decoding at each exit (`Decoder`, mode fixed): after a warm-up,
(time of N new tokens - time of 1) / (N - 1), the best of a few repeats, batch 1, so prefill
and compilation are excluded. `dump_generations` writes one JSON line per (instruction, exit,
checkpoint) with {instruction, input, response} as a PandaLM-style judge reads them;
`pairs.make_pairs` turns two of those columns into the judge's {instruction, input, response1,
response2}.

Defaults (template, max_len, exits, data seed, held-out records of a JSON file, compute dtype)
come from the first checkpoint's `train_config.json` (or `ict.json`) when it has one. Several
checkpoints are validated together before any weights are read, and evaluated one after the
other, so only one model's weights are in host memory at a time.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import jax
import jax.numpy as jnp
import optax

from sorted_jax.core.errors import EvalError
from sorted_jax.data import EvalIterator, Tokenizer, open_split_records, tokenize_records
from sorted_jax.data.records import require_file
from sorted_jax.evaluation import per_exit, triviaqa
from sorted_jax.io import artifacts, destinations, reports
from sorted_jax.io.run_settings import RunSettings
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.modeling import DTYPES, make_model
from sorted_jax.objective import heads, soft
from sorted_jax.parallel import sharding
from sorted_jax.training.run_data import data_stats, data_stats_line
from sorted_jax.training.train_step import SoftSteps, sum_exit_sums

METRICS_MD, METRICS_JSON = "exit_metrics.md", "exit_metrics.json"
QUALITY_PNG, SPEED_PNG = "exit_quality.png", "speed_quality.png"
COMMAND = "sorted_jax.evaluate"


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """One evaluation as asked: a field per flag of `python -m sorted_jax.evaluate` (same name,
    same default); None = the first checkpoint's recorded setting, else the built-in default."""

    ckpt: Sequence[str]
    data: str
    label: Sequence[str] | None = None
    split: str = "eval"
    holdout: int | None = None
    limit: int = 0
    exits: str | None = None
    template: str | None = None
    tokenizer: str | None = None
    max_len: int | None = None
    batch_size: int = 32
    dtype: str | None = None
    mesh: str = "1,-1,1"
    out: str = "eval_out"
    overwrite: bool = False
    latency: bool = False
    latency_tokens: int = 64
    dump_generations: str | None = None
    num_generations: int = 20
    max_new_tokens: int = 64
    gen_batch_size: int = 8
    triviaqa: str | None = None
    triviaqa_limit: int = 0
    triviaqa_max_new_tokens: int = 24
    triviaqa_template: str = "raw"


# ---------------------------------------------------------------------------------------------
# checkpoints


@dataclasses.dataclass
class Checkpoint:
    """One checkpoint: what its path holds and its tokenizer at once; weights on `load()`."""

    label: str
    art: artifacts.Artifact
    tokenizer: Tokenizer
    params: dict | None = None
    heads: heads.IctHeads | None = None
    # Decoders of the loaded weights at any exit, shared by latency, generations and TriviaQA.
    models: per_exit.ExitModels | None = None

    @property
    def path(self) -> Path:
        return self.art.path

    @property
    def config(self) -> LlamaConfig:
        return self.art.config

    @property
    def settings(self) -> RunSettings:
        return self.art.settings

    @property
    def is_ict(self) -> bool:
        return self.art.is_ict

    def default_exits(self) -> tuple[int, ...]:
        return self.art.default_exits()

    def load(self) -> Checkpoint:
        if self.params is None:
            self.params = self.art.load_params()
            self.heads = self.art.load_heads()
            self.models = per_exit.ExitModels(self.params, self.config, self.heads)
        return self

    def unload(self) -> None:
        self.params, self.heads, self.models = None, None, None


def load_checkpoint(path: str | Path, label: str, tokenizer_spec: str | None = None,
                    load_weights: bool = True) -> Checkpoint:
    """What a model dir, training workdir or SFT+ICT dir holds, its tokenizer (and with
    `load_weights` the weights and ICT heads)."""
    art = artifacts.inspect(path, f"checkpoint {label!r}")
    ckpt = Checkpoint(label, art, art.tokenizer(tokenizer_spec))
    return ckpt.load() if load_weights else ckpt


def resolve_exits_for(ckpt: Checkpoint, exits: str | None) -> tuple[int, ...]:
    """`exits` (the flag's text) for this checkpoint's depth; an SFT+ICT dir needs a head each."""
    if exits is None:
        out = ckpt.default_exits()
    else:
        try:
            out = soft.resolve_exits(exits, ckpt.config.num_hidden_layers)
        except soft.ExitError as e:
            raise e.prefixed(f"--exits {exits} for checkpoint {ckpt.label!r} ({ckpt.path}, "
                             f"{ckpt.config.num_hidden_layers} layers): ") from None
    if ckpt.art.head_exits is not None:
        missing = [e for e in out if e not in ckpt.art.head_exits]
        if missing:
            raise EvalError(f"checkpoint {ckpt.label!r} is SFT+ICT with heads for exits "
                            f"{list(ckpt.art.head_exits)} only; no head for exits {missing}")
    return out


def checkpoint_labels(paths: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    """One distinct label per checkpoint: the given ones, else the dir names (numbered when
    they repeat). No ':' in a label, since judge pairs name columns LABEL:EXIT."""
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


# ---------------------------------------------------------------------------------------------
# per-exit loss / accuracy


def _sums_fn(ckpt: Checkpoint, model: Any, steps: SoftSteps, exits: Sequence[int], mesh: Any):
    """batch -> per-exit sums: SoftSteps' eval step, or the ICT heads' for an SFT+ICT dir."""
    params = jax.device_put(ckpt.params, steps.params_shardings)
    if ckpt.heads is None:
        return lambda batch: steps.eval_step(params, batch)
    heads_eval = heads.HeadsEval(model, exits, mesh)
    sel = ckpt.heads.select(exits)
    tree = jax.device_put({k: jnp.asarray(v) for k, v in sel.tree().items()},
                          heads.heads_shardings(mesh, sharding.DEFAULT_RULES, sel))
    return lambda batch: heads_eval.eval_step(params, tree, batch)


def exit_quality(ckpt: Checkpoint, records: Sequence, exits: Sequence[int], *, template: str,
                 max_len: int, batch_size: int, mesh: Any, dtype: Any = jnp.float32,
                 buckets: Sequence[int] | None = None) -> dict[str, Any]:
    """{"exits": {n: {loss, perplexity, accuracy}}, "examples", "tokens"} on `records`."""
    ckpt.load()
    ds = tokenize_records(records, ckpt.tokenizer, max_len, template)
    if len(ds) == 0:
        raise EvalError(f"no record fits --max-len {max_len} (every prompt is too long)")
    model = make_model(ckpt.config, dtype=dtype, attention_impl="auto")
    dp = sharding.data_parallel_size(mesh)
    batch_size = -(-batch_size // dp) * dp
    it = EvalIterator(ds, batch_size, buckets=buckets)
    steps = SoftSteps(model, exits, optax.identity(), mesh)
    total = sum_exit_sums(_sums_fn(ckpt, model, steps, exits, mesh), it, steps.batch_shardings)
    m = {k: float(v) for k, v in jax.device_get(soft.exit_metrics(total, exits)).items()}
    per = {}
    for e in exits:
        loss = m[f"loss/exit_{e}"]
        per[e] = {"loss": loss, "perplexity": reports.perplexity(loss),
                  "accuracy": m[f"accuracy/exit_{e}"]}
    return {"exits": per, "tokens": int(m["tokens"]), **data_stats(ds, len(records))}


# ---------------------------------------------------------------------------------------------
# one evaluation


@dataclasses.dataclass(frozen=True)
class EvalSetup:
    """Everything `evaluate` resolves once, from the options and the first checkpoint's
    settings."""

    template: str
    max_len: int
    dtype_name: str
    seed: int
    holdout: int
    buckets: list[int] | None
    exits_of: dict[str, tuple[int, ...]]

    @property
    def dtype(self) -> Any:
        return DTYPES[self.dtype_name]


def resolve_setup(opts: EvalOptions, ckpts: Sequence[Checkpoint]) -> EvalSetup:
    """Options first, else what the first checkpoint's run recorded, else the defaults."""
    first = ckpts[0].settings
    max_len = opts.max_len or first.max_len or min(
        [512, *(c.config.max_position_embeddings for c in ckpts)])
    for c in ckpts:
        if max_len > c.config.max_position_embeddings:
            raise EvalError(f"--max-len {max_len} exceeds checkpoint {c.label!r}'s "
                            f"max_position_embeddings={c.config.max_position_embeddings}")
    holdout = opts.holdout if opts.holdout is not None else (
        first.eval_holdout if opts.data == first.data else 0)
    # the first checkpoint's exits, for every checkpoint
    exits_arg = opts.exits or ",".join(map(str, ckpts[0].default_exits()))
    buckets = first.buckets
    if buckets and max(buckets) < max_len:
        buckets = None
    return EvalSetup(
        template=opts.template or first.template or "alpaca", max_len=max_len,
        dtype_name=opts.dtype or first.dtype or "float32", seed=first.data_seed,
        holdout=holdout, buckets=buckets,
        exits_of={c.label: resolve_exits_for(c, exits_arg) for c in ckpts})


def evaluate_checkpoint(c: Checkpoint, opts: EvalOptions, setup: EvalSetup, records: Sequence,
                        items: Sequence | None, mesh: Any, gens_file: IO[str] | None
                        ) -> dict[str, Any]:
    """Everything `evaluate` reports for one checkpoint; its weights are dropped at the end."""
    t0 = time.time()
    c.load()
    print(f"loaded {c.label}: {c.path} ({c.config.num_hidden_layers} layers"
          + (", SFT+ICT heads" if c.is_ict else "") + f", {time.time() - t0:.1f}s)", flush=True)
    exits, dtype = setup.exits_of[c.label], setup.dtype
    q = exit_quality(c, records, exits, template=setup.template, max_len=setup.max_len,
                     batch_size=opts.batch_size, mesh=mesh, dtype=dtype, buckets=setup.buckets)
    res: dict[str, Any] = {"label": c.label, "path": str(c.path),
                           "num_layers": c.config.num_hidden_layers,
                           "ict_heads": c.is_ict, "examples": q["examples"],
                           "tokens": q["tokens"], "exits": q["exits"],
                           **{k: q[k] for k in ("records", "dropped", "truncated",
                                                "first_dropped")}}
    line = data_stats_line(q, f"--max-len {setup.max_len}")
    if line:
        print(f"{c.label}: {line}", flush=True)
    print(f"{c.label}: " + " ".join(f"e{e} {v['loss']:.4f}" for e, v in q["exits"].items())
          + f" ({q['examples']} examples, {time.time() - t0:.1f}s)", flush=True)
    if items is not None:
        tq = per_exit.triviaqa_em(c.models, c.tokenizer, exits, items,
                                  max_new_tokens=opts.triviaqa_max_new_tokens,
                                  batch_size=opts.gen_batch_size, dtype=dtype,
                                  template=opts.triviaqa_template)
        res["triviaqa"] = {str(e): v for e, v in tq.items()}
        for e, v in tq.items():
            res["exits"][e]["triviaqa_em"] = v["em"]
    if opts.latency:
        prompt = per_exit.prompt_ids(c.tokenizer, records[0], setup.template)
        for e, ms in per_exit.measure_latency(c.models, exits, prompt,
                                              new_tokens=opts.latency_tokens,
                                              dtype=dtype).items():
            res["exits"][e]["ms_per_token"] = ms
    if gens_file is not None:
        line = {"label": c.label, "num_layers": c.config.num_hidden_layers,
                "checkpoint": str(c.path), "ict_head": c.is_ict}
        res["generations"] = per_exit.dump_generations(
            c.models, c.tokenizer, exits, records[:opts.num_generations], gens_file,
            template=setup.template, max_new_tokens=opts.max_new_tokens,
            batch_size=opts.gen_batch_size, dtype=dtype, line=line)
    c.unload()
    return res


def _check_options(opts: EvalOptions) -> list[str]:
    """The checkpoints' labels, once the options that need no file read are checked."""
    labels = checkpoint_labels(opts.ckpt, opts.label)
    for flag in ("batch_size", "max_new_tokens", "gen_batch_size", "latency_tokens"):
        if getattr(opts, flag) < 1:
            raise EvalError(f"--{flag.replace('_', '-')} must be >= 1")
    if opts.triviaqa:
        require_file(opts.triviaqa, "--triviaqa file", EvalError)
    return labels


def _is_eval_dir(path: Path) -> bool:
    """A dir of evaluate's reports (also those written before markers existed)."""
    names = {p.name for p in path.iterdir()}
    return METRICS_JSON in names and names <= {METRICS_MD, METRICS_JSON, QUALITY_PNG, SPEED_PNG,
                                               destinations.MARKER}


# A `--dump-generations` file: its first line is one of its JSON records.
_is_generation_dump = destinations.jsonl_with_keys("label", "exit", "response")


def _claim_outputs(opts: EvalOptions
                   ) -> tuple[destinations.Destination, destinations.Destination | None]:
    """`out` (and `dump_generations`), checked before anything is read."""
    inputs = [*opts.ckpt, opts.data, opts.triviaqa, opts.tokenizer]
    out = destinations.claim_dir(opts.out, flag="--out", command=COMMAND, inputs=inputs,
                                 overwrite=opts.overwrite, recognise=_is_eval_dir)
    gens = None if not opts.dump_generations else destinations.claim_file(
        opts.dump_generations, flag="--dump-generations", command=COMMAND,
        inputs=[*inputs, opts.out], overwrite=opts.overwrite, recognise=_is_generation_dump)
    return out, gens


def _evaluate_all(opts: EvalOptions, ckpts: Sequence[Checkpoint], setup: EvalSetup,
                  records: Sequence, items: Sequence | None,
                  gens: destinations.Destination | None) -> list[dict[str, Any]]:
    mesh = sharding.parse_mesh(opts.mesh)
    if gens is None:
        return [evaluate_checkpoint(c, opts, setup, records, items, mesh, None) for c in ckpts]
    with destinations.atomic_file(gens) as gens_file:
        return [evaluate_checkpoint(c, opts, setup, records, items, mesh, gens_file)
                for c in ckpts]


def write_reports(opts: EvalOptions, setup: EvalSetup, results: Sequence[dict],
                  out_dir: Path) -> dict[str, Any]:
    """The reports into `out_dir` (the temp sibling of `out`, renamed once all are written)."""
    held = f", {setup.holdout} held out" if setup.holdout else ""
    title = (f"Per-exit held-out metrics on {opts.data} ({opts.split}{held}; "
             f"{results[0]['examples']} examples, template {setup.template}, max_len "
             f"{setup.max_len}; loss = nats/token on response tokens, acc = top-1 token "
             "accuracy)")
    table = reports.metrics_table(results, title)
    (out_dir / METRICS_MD).write_text(table)
    summary = {"data": opts.data, "split": opts.split, "holdout": setup.holdout,
               "data_seed": setup.seed, "limit": opts.limit, "template": setup.template,
               "max_len": setup.max_len, "dtype": setup.dtype_name, "triviaqa": opts.triviaqa,
               "checkpoints": [{**r, "exits": {str(e): v for e, v in r["exits"].items()}}
                               for r in results]}
    (out_dir / METRICS_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    reports.plot_quality(results, out_dir / QUALITY_PNG)
    if opts.latency:
        reports.plot_speed(results, out_dir / SPEED_PNG)
    if opts.dump_generations:
        n = sum(r["generations"] for r in results)
        print(f"wrote {n} generations (instruction x exit x checkpoint) to "
              f"{opts.dump_generations}", flush=True)
    print("\n" + table, flush=True)
    return summary


def evaluate(opts: EvalOptions) -> dict[str, Any]:
    """Check, load, measure every checkpoint, write the reports; the summary JSON's content."""
    labels = _check_options(opts)
    out, gens = _claim_outputs(opts)
    ckpts = [load_checkpoint(path, label, opts.tokenizer, load_weights=False)
             for path, label in zip(opts.ckpt, labels, strict=True)]
    setup = resolve_setup(opts, ckpts)
    records = open_split_records(opts.data, opts.split, holdout=setup.holdout, seed=setup.seed,
                                 limit=opts.limit)
    items = None
    if opts.triviaqa:
        items = triviaqa.load_triviaqa(opts.triviaqa, limit=opts.triviaqa_limit or None)
    results = _evaluate_all(opts, ckpts, setup, records, items, gens)
    with destinations.atomic_dir(out) as tmp:
        summary = write_reports(opts, setup, results, tmp)
    names = [METRICS_MD, METRICS_JSON, QUALITY_PNG] + ([SPEED_PNG] if opts.latency else [])
    print(f"wrote {', '.join(str(out.path / n) for n in names)}", flush=True)
    return summary
