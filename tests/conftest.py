"""Shared test setup: 8 fake CPU devices for mesh tests, real assets, tiny real HF models."""

from __future__ import annotations

import os

# Must happen before JAX initialises its backend: sharding tests need 8 devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


@pytest.fixture(autouse=True)
def _no_persistent_compilation_cache_left_on():
    """A test that runs `train` in this process with `compilation_cache_dir` turns JAX's
    persistent cache on for every later test (into a temp dir pytest deletes): later compiles
    then write serialized executables there, which once crashed XLA mid-suite. Fail that test
    and switch the cache off again."""
    import jax

    before = jax.config.jax_compilation_cache_dir
    yield
    after = jax.config.jax_compilation_cache_dir
    if after != before:
        from jax._src import compilation_cache

        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()
        pytest.fail(f"the test left JAX's persistent compilation cache at {after!r}: run train "
                    "in a subprocess for a cache, or leave compilation_cache_dir unset")


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    if not ASSETS.is_dir():
        pytest.skip(f"shared test assets not found at {ASSETS}")
    return ASSETS


def make_hf_llama(config, seed: int = 0):
    """A real HF `LlamaForCausalLM` in fp32 eval mode, with random weights for `config`.

    Norm weights are randomised too (HF initialises them to ones, which would hide a norm
    that is skipped or applied twice).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def hf_llama_factory():
    return make_hf_llama
