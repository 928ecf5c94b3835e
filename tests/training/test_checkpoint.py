"""Checkpointer: Orbax save/restore of the sharded train state, data position and metadata."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest
from helpers import REPO, TRAIN_SMALL_CONFIG

from sorted_jax.io import model_io
from sorted_jax.model.modeling import make_model
from sorted_jax.parallel.sharding import make_mesh
from sorted_jax.training import checkpoint_integrity as integrity
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


def test_keep_one_never_deletes_the_newest_healthy_step(tmp_path):
    """keep_checkpoints=1 (configs/tiny_pretrain.py): Orbax alone would delete the last good
    step as soon as a new one, whose health is not known yet, is saved."""
    steps = make_steps(mesh_shape=(-1, 1, 1))
    state = steps.init_state(jax.random.PRNGKey(1))
    saved = []
    ckpt = Checkpointer(tmp_path, keep=1, async_save=False, on_saved=saved.append)
    ckpt.save(1, state, {"epoch": 0, "index": 1}, {})
    ckpt.record_health(1, integrity.GOOD, "finite at step 2")
    ckpt.save(2, state, {"epoch": 0, "index": 2}, {})  # unchecked: step 1 must stay
    assert ckpt.all_steps() == [1, 2]
    ckpt.record_health(2, integrity.GOOD, "finite at step 3")
    ckpt.save(3, state, {"epoch": 0, "index": 3}, {})
    assert ckpt.all_steps() == [2, 3]  # step 2 is now the newest healthy one
    ckpt.record_health(3, integrity.DIVERGED, "nan at step 4")
    ckpt.save(4, state, {"epoch": 0, "index": 4}, {})
    assert ckpt.all_steps() == [2, 4]  # a diverged step is not kept for its health
    assert ckpt.last_good_step() == 2
    assert saved == [1, 2, 3, 4]  # on_saved: once each, when committed
    ckpt.close()
    assert sorted(p.stem for p in (tmp_path / integrity.MANIFEST_DIR).glob("*.json")) == [
        "2", "4"]


FAILED_CLOSE = textwrap.dedent("""
    import resource, signal, sys
    sys.path[:0] = sys.argv[2:4]  # this test dir and tests/ (helpers)
    import jax
    from test_checkpoint import make_steps
    from sorted_jax.training.checkpoint import Checkpointer, CheckpointError

    steps = make_steps(mesh_shape=(-1, 1, 1))
    state = steps.init_state(jax.random.PRNGKey(0))
    ckpts = [Checkpointer(f"{sys.argv[1]}/{name}", keep=0) for name in ("a", "b")]
    for ckpt in ckpts:
        ckpt.save(1, state, {"epoch": 0, "index": 1}, {})
        ckpt.wait()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # every file write > 8 KB fails from now on
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
    for ckpt in ckpts:
        ckpt.save(2, state, {"epoch": 0, "index": 2}, {})  # fails in the background
    # a run already failing: the failed save is said on its own line, close() returns
    ckpts[0].close(failing=RuntimeError("the run's own error"))
    print("failing: close() returned", flush=True)
    try:
        ckpts[1].close()
    except CheckpointError as e:
        print("RAISED:", e)
        sys.exit(0)
    print("close() returned")
    sys.exit(1)
""")


def test_close_raises_a_failed_final_save(tmp_path):
    """The last async save of a run fails (a full disk) and nothing polls it any more: close()
    raises it rather than swallowing it; on an error path (`failing`) it is said on its own
    line instead, so the run's own error is not replaced."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    here = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-c", FAILED_CLOSE, str(tmp_path), str(here),
                           str(here.parent)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "failing: close() returned" in proc.stdout
    warnings = [x for x in proc.stderr.splitlines() if "sorted_jax.train: warning:" in x]
    assert len(warnings) == 1 and "could not save step 2" in warnings[0], proc.stderr[-3000:]
    assert "RAISED: could not save step 2" in proc.stdout, proc.stdout
    for name in ("a", "b"):
        assert model_io.workdir_steps(tmp_path / name) == [1]
