"""Shared test fixtures-as-values: the tiny model configs, random weights, tiny model dirs, the
small training command line and XLA's cheap compile options (one place instead of one copy
per test file)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sorted_jax.model.config import LlamaConfig, preset
from sorted_jax.model.modeling import abstract_params, make_model

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
TINY_CONFIG_FILE = REPO / "configs" / "tiny.py"

# Decoders and reference functions compile with XLA's cheap optimisation level (tiny models).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# -- model configs ----------------------------------------------------------------------------

# The byte tokenizer's vocab (264), 4 layers of width 32: ICT, evaluate, command errors.
BYTE_4L = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
# The byte tokenizer's vocab, width 64 and a 96-position context: the generate CLI.
BYTE_4L_W64 = LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=96, bos_token_id=1, eos_token_id=2)
# Grouped-query attention, 4 layers: decoding, the sharded train step, the SoFT loss' HF
# parity.
GQA_4L = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     eos_token_id=2)
# Decoding with multi-head attention, 6 layers.
MHA_6L = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=6,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                     eos_token_id=2)
# A 16-token vocab: speculative sampling's exact marginals enumerate every prefix.
SMALL_VOCAB_4L = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=32, eos_token_id=None)
# model_io: 2 layers, a vocab that is not the tokenizer's.
IO_2L = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
# The memory planner: 2 layers, width 64, full multi-head attention.
PLAN_2L = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4)
# One-device train steps (packing, exit curriculum, SFT loss): 3 layers, so exits 1..3 are all.
W32_3L = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# Weights that force each next token: one-hot embeddings need vocab <= width; EOS is token 5.
FORCED_2L = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                        bos_token_id=1, eos_token_id=5)
# End to end on SmolLM2's real tokenizer: its vocab (49152), tied embeddings as SmolLM2 has.
SMOL_VOCAB_2L = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                            tie_word_embeddings=True)
# The `tiny` preset (what configs/tiny.py trains) with the byte tokenizer's vocab: 8 layers.
TINY_PRESET_BYTE = preset("tiny").replace(vocab_size=264)

# Compiled, never run (XLA's per-device program and memory analysis on fake CPU devices):
# the loss-sharding shape of the issue, 4 layers, vocab 2048, width 128;
LOSS_4L = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=4, num_attention_heads=4)
# the memory-test shape, where the exits' logits dominate: vocab 32000, width 256, 8 layers;
MEMORY_8L = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688,
                        num_hidden_layers=8, num_attention_heads=4)
# the same with a small vocab, where the logits do not dominate and an extra stack would show.
MEMORY_8L_V512 = MEMORY_8L.replace(vocab_size=512)


def tiny_config(kv: int = 4, tied: bool = False, layers: int = 3, vocab: int = 128,
                **kw) -> LlamaConfig:
    """Conversion tests' model: width 64, 4 heads, `kv` kv heads, `layers` layers."""
    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv,
                       tie_word_embeddings=tied, max_position_embeddings=64, **kw)


# The model's own HF parity tests: grouped-query heads of dim 16 (the llama3 rope bands need it).
GQA_3L = tiny_config(kv=2)


# -- training ---------------------------------------------------------------------------------

# A 2-layer, width-32 model on the builtin data: compiles in seconds on 2 cores.
TRAIN_SMALL = [
    "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
    "--config.model.num_hidden_layers=2", "--config.model.num_attention_heads=2",
    "--config.model.num_key_value_heads=1", "--config.exits=1,2", "--config.eval_exits=",
    "--config.batch_size=8", "--config.eval_batches=2", "--config.eval_at_start=False",
    "--config.optim.schedule=constant",
    "--config.optim.warmup_steps=0", "--config.optim.lr=3e-3", "--config.data.max_records=400",
]
# The model TRAIN_SMALL trains; the checkpointer's too (width 32 and 64 split 8 ways).
TRAIN_SMALL_CONFIG = preset("tiny").replace(vocab_size=264, hidden_size=32,
                                            intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1)


# -- weights and model dirs -------------------------------------------------------------------

def random_params(config: LlamaConfig, seed: int = 0, *, std: float = 0.1,
                  as_jax: bool = False) -> dict:
    """float32 weights ~ N(0, std); norm scales ~ 1 + N(0, 0.2) (ones would hide a skipped or
    doubled norm). numpy leaves, or jax arrays with `as_jax`; no compilation."""
    shapes = nn.unbox(abstract_params(make_model(config)))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if "scale" in jax.tree_util.keystr(path):
            v = (1.0 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
        else:
            v = (std * rng.standard_normal(x.shape)).astype(np.float32)
        return jnp.asarray(v) if as_jax else v

    return jax.tree_util.tree_map_with_path(fill, shapes)


def tiny_model_dir(path: Path, config: LlamaConfig = BYTE_4L, seed: int = 0) -> Path:
    """A model dir of random weights with the builtin (byte) tokenizer."""
    from sorted_jax.data.tokenizers import save_tokenizer_files
    from sorted_jax.io.model_io import save_model_dir

    save_model_dir(path, random_params(config, seed), config)
    save_tokenizer_files("builtin", path)
    return path


def tiny_workdir(path: Path, config: LlamaConfig, params_by_step: Mapping[int, Any]) -> Path:
    """A training workdir in the layout the trainer writes, by the library's own writers: the
    model's config.json, and per step a `Checkpointer` save of a train state (these params, an
    Adam state, the step) with a data position and metadata. No steps: a run that stopped
    before its first save (an empty checkpoints/)."""
    import optax

    from sorted_jax.io.model_io import CONFIG_FILE
    from sorted_jax.training.checkpoint import Checkpointer
    from sorted_jax.training.train_step import TrainState

    path.mkdir(parents=True)
    config.to_json_file(path / CONFIG_FILE)
    checkpointer = Checkpointer(path, keep=0, async_save=False)
    tx = optax.adam(1e-3)
    for step, params in sorted(params_by_step.items()):
        params = jax.tree.map(jnp.asarray, params)
        state = TrainState(jnp.asarray(step, jnp.int32), params, tx.init(params))
        checkpointer.save(step, state, {"epoch": 0, "index": 32 * step}, {"step": step})
    checkpointer.close()
    return path


def one_device_mesh():
    from sorted_jax.parallel.sharding import make_mesh

    return make_mesh((1, 1, 1), jax.devices()[:1])


def random_batch(vocab_size: int, b: int = 8, t: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """A training batch whose rows differ: random ids, a random length per row (right padding)
    and a random loss mask inside it, so per-row logic and padding are exercised."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab_size, (b, t)).astype(np.int32)
    lengths = rng.randint(t // 2, t + 1, b)
    attn = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    mask = (rng.rand(b, t) > 0.3).astype(np.float32) * attn
    return {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": mask,
            "attention_mask": attn}


def last_axis_shardings(params: Any) -> Any:
    """Each leaf split over 8 devices on its last axis where it divides, else replicated."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))

    def spec(x):
        if x.shape[-1] % 8 == 0:
            return NamedSharding(mesh, PartitionSpec(*([None] * (x.ndim - 1)), ("a", "b")))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(spec, params)
