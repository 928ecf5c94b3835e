"""The resolved run spec: every file in configs/ parses and resolves (no device, nothing
compiled) to the paper's recipe; the spec is frozen; what a run records reads back as typed
settings."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from helpers import REPO

from sorted_jax.core.errors import ModelIOError, TrainConfigError
from sorted_jax.data import save_tokenizer_files
from sorted_jax.io import run_settings
from sorted_jax.model.config import preset
from sorted_jax.training import run_spec

CONFIGS = sorted((REPO / "configs").glob("*.py"))
SOFT_7B = (12, 16, 20, 24, 28, 32)  # the paper's exit sets (Sec. 4)
SOFT_13B = (12, 16, 20, 24, 28, 32, 36, 40)
EXPECTED = {  # config file -> (preset, exits, eval exits, the last exit's weight share or None)
    "tiny.py": ("tiny", (2, 4, 6, 8), (2, 4, 6, 8), None),  # None: the paper's uniform mean
    "tiny_pretrain.py": ("tiny", (8,), (2, 4, 6, 8), None),  # the pretrained-then-SoFT demo
    "tiny_finetune.py": ("tiny", (2, 4, 6, 8), (2, 4, 6, 8), None),
    # the real-model recipe (SmolLM2-135M-Instruct on the Alpaca demo records, chat template)
    "smollm2_alpaca.py": ("smollm2-135m", (6, 12, 18, 24, 30), (6, 12, 18, 24, 30), None),
    "soft_7b.py": ("llama2-7b", SOFT_7B, SOFT_7B, 0.5),  # the chosen recipe: exit_weights=last
    "sft_7b.py": ("llama2-7b", (32,), SOFT_7B, None),
    "soft_13b.py": ("llama2-13b", SOFT_13B, SOFT_13B, 0.5),
    # step 2 of "SFT, then exit adapters": the SFT run frozen, a decoder layer per exit
    "soft_7b_adapters.py": ("llama2-7b", SOFT_7B, SOFT_7B, None),
    # SoFT on one GPU: the soft_7b recipe as rank-16 LoRA over a bf16 / NF4 base
    "soft_7b_lora.py": ("llama2-7b", SOFT_7B, SOFT_7B, 0.5),
    "soft_7b_qlora.py": ("llama2-7b", SOFT_7B, SOFT_7B, 0.5),
}


def test_every_config_file_is_covered():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


def _base_model_dir(path, name: str):
    """A stand-in for `init_from`: the preset's config.json and a tokenizer, no weights."""
    path.mkdir()
    preset(name).to_json_file(path / "config.json")
    save_tokenizer_files("builtin", path)
    return path


@pytest.mark.parametrize("config_file", CONFIGS, ids=lambda p: p.name)
def test_config_file_resolves(config_file, tmp_path):
    name, exits, eval_exits, last_share = EXPECTED[config_file.name]
    argv = ["train", f"--config={config_file}", f"--workdir={tmp_path / 'run'}"]
    config, workdir = run_spec.parse_args(argv)
    if config.data.tokenizer == "":  # the paper's configs take the tokenizer from init_from
        base = _base_model_dir(tmp_path / "base", name)
        config, workdir = run_spec.parse_args([*argv, f"--config.init_from={base}"])
    spec = run_spec.resolve(config, workdir)
    assert spec.model_config.num_hidden_layers == preset(name).num_hidden_layers
    assert spec.exits == exits and spec.eval_exits == eval_exits
    weights = np.asarray(spec.exit_weights)
    assert len(weights) == len(exits) and weights.sum() == pytest.approx(1.0)
    if last_share is None:  # the mean
        assert len(set(spec.exit_weights)) == 1
    else:  # the deepest exit gets its share, the sub-models split the rest equally
        assert weights[-1] == pytest.approx(last_share)
        np.testing.assert_allclose(weights[:-1], (1 - last_share) / (len(exits) - 1), rtol=1e-6)
    assert spec.resume_step is None and not spec.resuming
    c = spec.config
    assert c.max_len <= spec.model_config.max_position_embeddings
    assert c.batch_size % c.grad_accum == 0
    if name == "smollm2-135m":  # a CPU-sized real-model recipe: chat template, short rows
        assert (c.data.template, c.max_len, c.data.eval) == ("chat", 128, "runs/real/eval.json")
    elif name != "tiny":  # the paper's recipe: Alpaca, lr 2e-5 cosine, 2 epochs, batch 32
        # LoRA's adapters start at zero (its usual rate); exit adapters train alone: 10x SFT's
        lr = 2e-4 if c.lora.rank or c.exit_adapters != "none" else 2e-5
        assert (c.data.train, c.data.template, c.optim.lr, c.optim.schedule, c.epochs,
                c.batch_size) == ("tfds:stanford_alpaca", "alpaca", lr, "cosine", 2.0, 32)
        assert spec.tokenizer_spec == str(tmp_path / "base")
    if c.lora.rank:  # one device, micro-batches of 4 x 2048, a frozen base
        assert (c.lora.rank, tuple(c.mesh.shape), c.batch_size // c.grad_accum, c.max_len) == (
            16, (1, 1, 1), 4, 2048)
        assert c.lora.base_dtype == ("nf4" if "qlora" in config_file.name else "bfloat16")
    if c.exit_adapters != "none":  # one adapter layer per exit below the last
        assert spec.model_config.exit_adapters == exits[:-1] and c.distill_weight == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.exits = (1,)  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        spec.config.batch_size = 1  # a FrozenConfigDict


def test_resolution_errors_are_train_config_errors(tmp_path):
    argv = ["train", f"--config={REPO / 'configs' / 'tiny.py'}", f"--workdir={tmp_path / 'r'}"]
    config, workdir = run_spec.parse_args([*argv, "--config.exit_weights=1,x"])
    with pytest.raises(TrainConfigError, match="exit_weights must be comma-separated numbers"):
        run_spec.resolve(config, workdir)
    config, workdir = run_spec.parse_args([*argv, "--config.model.preset="])
    with pytest.raises(TrainConfigError, match="model.vocab_size=264 is set: overrides apply to a "
                       "preset"):
        run_spec.resolve(config, workdir)


def test_recorded_settings_read_back(tmp_path):
    argv = ["train", f"--config={REPO / 'configs' / 'tiny.py'}", f"--workdir={tmp_path / 'r'}",
            "--config.data.buckets=40,48", "--config.data.eval_holdout=0"]
    spec = run_spec.resolve(*run_spec.parse_args(argv))
    spec.write_files()
    s = run_settings.read_run_settings(spec.workdir)
    assert (s.data, s.template, s.max_len, s.batch_size, s.dtype, s.buckets, s.train_exits,
            s.eval_exits, s.tokenizer) == ("builtin", "plain", 48, 32, "float32", [40, 48],
                                           "2,4,6,8", "2,4,6,8", "builtin")
    assert s.lr == pytest.approx(3e-3) and s.eval_holdout == 0 and s.data_seed == 0
    meta = spec.checkpoint_meta(5, 10, 1)
    assert meta["exits"] == [2, 4, 6, 8] and meta["train_config"]["max_len"] == 48
    assert spec.changed_fields(meta["train_config"]) == []
    assert spec.changed_fields({**meta["train_config"], "seed": 9}) == ["seed"]
    ict = run_settings.read_run_settings(tmp_path, {"data": "d.json", "holdout": 3, "buckets": [8]})
    assert (ict.data, ict.eval_holdout, ict.buckets, ict.train_exits) == ("d.json", 3, [8], None)
    (tmp_path / "broken").mkdir()
    assert run_settings.read_run_settings(tmp_path / "broken") == run_settings.RunSettings()
    # a record that cannot be read is refused, not silently replaced by the defaults
    (tmp_path / "broken" / run_settings.TRAIN_CONFIG_FILE).write_text(json.dumps([1, 2]))
    with pytest.raises(ModelIOError, match="is not a training config"):
        run_settings.read_run_settings(tmp_path / "broken")
