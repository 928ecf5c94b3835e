"""Checkpointer: Orbax save/restore of the sharded train state, data position and metadata."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest
from helpers import TRAIN_SMALL_CONFIG

from sorted_jax.io import model_io
from sorted_jax.model.modeling import make_model
from sorted_jax.parallel.sharding import make_mesh
from sorted_jax.training.checkpoint import Checkpointer, CheckpointError
from sorted_jax.training.train_step import SoftSteps, make_optimizer

CONFIG = TRAIN_SMALL_CONFIG


def make_steps(config=CONFIG, mesh_shape=(1, -1, 1)):
    tx, sched = make_optimizer(lr=1e-3, total_steps=10, warmup_steps=2)
    return SoftSteps(make_model(config), "1,2", tx, make_mesh(mesh_shape), schedule=sched)


def test_roundtrip_onto_fsdp_shardings(tmp_path):
    steps = make_steps()  # 8 devices on the fsdp axis: params really are split
    state = steps.init_state(jax.random.PRNGKey(0))
    state = state.replace(step=state.step + 5)
    expected = jax.tree.map(np.asarray, state)
    ckpt = Checkpointer(tmp_path, keep=2)
    assert ckpt.save(5, state, {"epoch": 0, "index": 40}, {"exits": [1, 2]})
    assert not ckpt.save(5, state, {}, {})  # an existing step is left alone
    # the trainer donates the state to the next step while the async save is writing
    jax.tree.map(lambda x: x.delete(), state)
    ckpt.wait()
    assert ckpt.all_steps() == [5] and ckpt.latest_step() == 5

    restored, data, meta = ckpt.restore(5, nn.unbox(steps.abstract_state),
                                        steps.state_shardings)
    ckpt.close()
    assert data == {"epoch": 0, "index": 40} and meta == {"exits": [1, 2]}
    # same tree (optimizer namedtuples included), same values, the run's shardings
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored), expected)
    kernel = restored.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding == steps.state_shardings.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert not kernel.sharding.is_fully_replicated

    # model_io reads the same layout (params only)
    CONFIG.to_json_file(tmp_path / "config.json")
    params, config, step = model_io.load_workdir_params(tmp_path)
    assert step == 5 and config == CONFIG
    chex.assert_trees_all_equal(params, expected.params)


def test_keep_n_and_restore_mismatch(tmp_path):
    steps = make_steps(mesh_shape=(-1, 1, 1))
    state = steps.init_state(jax.random.PRNGKey(1))
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    for s in (1, 2, 3):
        ckpt.save(s, state, {"epoch": 0, "index": s}, {})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    other = make_steps(CONFIG.replace(hidden_size=64, intermediate_size=128),
                       mesh_shape=(-1, 1, 1))
    with pytest.raises(CheckpointError, match="cannot restore step 3"):
        ckpt.restore(3, nn.unbox(other.abstract_state), other.state_shardings)
    ckpt.close()
