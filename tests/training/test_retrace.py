"""No retracing (`chex.assert_max_traces`): the train step and the eval step trace once for a
whole run, and each decoding program traces once however many requests and decoders use it.

The bodies that `jax.jit` wraps are replaced by trace-counting versions before anything jits
them, so a second trace of the same program fails the test.
"""

from __future__ import annotations

import chex
import pytest
from helpers import FAST, GQA_4L, TINY_CONFIG_FILE, TRAIN_SMALL, random_params

from sorted_jax.decoding import DecodeOptions, Decoder, programs
from sorted_jax.training.run_spec import parse_args
from sorted_jax.training.train_step import SoftSteps
from sorted_jax.training.trainer import Trainer


@pytest.fixture
def count_traces(monkeypatch):
    """count_traces(cls, name, n): `cls.name` may be traced at most n times from now on."""
    chex.clear_trace_counter()

    def limit(cls, name: str, n: int) -> None:
        monkeypatch.setattr(cls, name, chex.assert_max_traces(getattr(cls, name), n=n))

    yield limit
    programs._jitted.cache_clear()  # drop jitted functions built around the counting bodies
    chex.clear_trace_counter()


def test_train_and_eval_steps_trace_once_per_run(tmp_path, count_traces):
    count_traces(SoftSteps, "_train_step", 1)
    count_traces(SoftSteps, "_eval_step", 1)
    config, _ = parse_args([
        "train", f"--config={TINY_CONFIG_FILE}", "--workdir=unused", *TRAIN_SMALL,
        "--config.num_steps=6", "--config.eval_every=2", "--config.log_every=1",
        "--config.checkpoint_every=3", "--config.tensorboard=False"])
    trainer = Trainer(config, tmp_path / "run")
    result = trainer.train()
    assert result["step"] == 6 and result["eval"] is not None  # 6 steps, 4 evaluations


def test_each_decoding_program_traces_once(count_traces):
    """fixed / early-exit / speculative (greedy) and fixed (sampling): four programs, each run
    by two decoders with different prompts, seeds and temperatures; streaming adds one prefill
    (batch 1) and one step program."""
    programs._jitted.cache_clear()
    count_traces(programs.Programs, "_prefill", 5)
    count_traces(programs.Programs, "_loop", 4)
    count_traces(programs.Programs, "_step", 1)
    params = random_params(GQA_4L, 0, std=0.08, as_jax=True)
    decoders = [Decoder(params, GQA_4L, compiler_options=FAST, max_draft=4) for _ in range(2)]
    requests = [DecodeOptions(mode="fixed", exit_layer=2),
                DecodeOptions(mode="early-exit", exits=(1, 2, 4), thresholds=(0.5, 0.5)),
                DecodeOptions(mode="speculative", draft_layer=2)]
    prompts = ([[1, 5, 6], [1, 7]], [[1, 9, 9, 9], [1, 3]])
    for dec, batch in zip(decoders, prompts, strict=True):
        for opts in requests:
            res = dec.generate(batch, opts.replace(max_new_tokens=6, max_len=32))
            assert len(res.tokens) == 2
        for seed, temperature in ((1, 0.7), (2, 1.3)):  # traced knobs: the same program
            dec.generate(batch, mode="fixed", exit_layer=2, max_new_tokens=6, max_len=32,
                         temperature=temperature, seed=seed)
        pieces = list(dec.stream(batch[0], mode="fixed", exit_layer=2, max_new_tokens=6,
                                 max_len=32))
        assert sum(len(p) for p in pieces) == dec.last_stats.tokens
