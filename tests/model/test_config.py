"""LlamaConfig: HF config.json in and out, presets, clear errors for impossible shapes."""

from __future__ import annotations

import pytest
import transformers

from sorted_jax.model.config import PRESETS, ConfigError, LlamaConfig, preset, rope_inv_freq


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_roundtrip_through_transformers(name):
    cfg = preset(name)
    hf = transformers.LlamaConfig(**cfg.to_hf_dict())
    assert LlamaConfig.from_hf_dict(hf.to_dict()) == cfg
    assert hf.num_key_value_heads == cfg.kv_heads and hf.head_dim == cfg.dim_per_head


def test_known_parameter_counts():
    assert preset("llama2-7b").num_params() == 6_738_415_616
    assert preset("llama2-13b").num_params() == 13_015_864_320
    assert preset("llama3-8b").num_params() == 8_030_261_248


def test_reads_legacy_rope_scaling_and_5x_rope_parameters():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    legacy = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
              "rope_theta": 500000.0, "rope_scaling": scaling}
    new = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
           "rope_parameters": {**scaling, "rope_theta": 500000.0}}
    a, b = LlamaConfig.from_hf_dict(legacy), LlamaConfig.from_hf_dict(new)
    assert a == b and a.rope_type == "llama3" and a.rope_theta == 500000.0


def test_llama3_inv_freq_matches_transformers():
    import numpy as np
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = preset("llama3.1-8b")
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_dict())
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, torch.device("cpu"))
    np.testing.assert_allclose(np.asarray(rope_inv_freq(cfg), np.float32), ref.numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=100, num_attention_heads=3), "does not divide hidden_size"),
    (dict(num_attention_heads=8, num_key_value_heads=3, hidden_size=64), "does not divide"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "unknown rope_scaling type"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "missing"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
])
def test_invalid_values_raise_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LlamaConfig(**kwargs)


def test_submodel_and_unknown_preset():
    cfg = preset("llama2-13b")
    assert cfg.submodel(12).num_hidden_layers == 12
    with pytest.raises(ConfigError, match="1..40"):
        cfg.submodel(41)
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("llama9")


def test_json_file_roundtrip(tmp_path):
    cfg = preset("tiny").replace(tie_word_embeddings=True)
    cfg.to_json_file(tmp_path / "config.json")
    assert LlamaConfig.from_json_file(tmp_path / "config.json") == cfg
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert loaded.tie_word_embeddings and loaded.num_hidden_layers == cfg.num_hidden_layers
