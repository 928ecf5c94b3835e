"""The training CLI in subprocesses: SIGTERM then resume == uninterrupted, and a 2-process run.

Every subprocess sees one CPU device and shares a persistent XLA compilation cache, so only the
first run of each program pays for compiling.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from helpers import TRAIN_SMALL

from sorted_jax.io import model_io
from sorted_jax.training import metrics_log

REPO = Path(__file__).resolve().parents[2]
STEPS = 200  # long enough (a few seconds) to be interrupted mid-run

SMALL = [
    *TRAIN_SMALL, "--config.eval_every=0", "--config.log_every=1",
    "--config.checkpoint_every=50",
    # constant lr (TRAIN_SMALL): the first steps do not depend on num_steps (the 2-process run
    # is shorter)
    "--config.data.eval=none",  # no eval step to compile
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def env_one_device():
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    return env


def command(workdir, cache_dir, *extra):
    return [sys.executable, "-m", "sorted_jax.train", f"--config={REPO / 'configs' / 'tiny.py'}",
            f"--workdir={workdir}", *SMALL, f"--config.compilation_cache_dir={cache_dir}",
            *extra]


def run_cli(workdir, cache_dir, *extra, timeout=300):
    proc = subprocess.run(command(workdir, cache_dir, *extra), cwd=REPO, env=env_one_device(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_losses(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in metrics_log.read_metrics(workdir, "train")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted single-process run of STEPS steps."""
    wd = tmp_path_factory.mktemp("reference") / "run"
    run_cli(wd, cache_dir, f"--config.num_steps={STEPS}")
    return wd


def test_sigterm_then_resume_matches_uninterrupted(tmp_path, cache_dir, reference):
    wd = tmp_path / "run"
    proc = subprocess.Popen(command(wd, cache_dir, f"--config.num_steps={STEPS}"), cwd=REPO,
                            env=env_one_device(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if any(step >= 3 for step in train_losses(wd)):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    m = re.search(r"stopped by SIGTERM at step (\d+)", out)
    assert m, out[-3000:]
    stopped = int(m.group(1))
    assert 3 <= stopped < STEPS
    assert model_io.workdir_steps(wd)[-1] == stopped
    data = json.loads((wd / "checkpoints" / str(stopped) / "data" / "metadata").read_text())
    assert data["index"] == stopped * 8
    # exit 0 like a finished run, but the marker tells a launcher it was preempted
    status = json.loads((wd / "run_status.json").read_text())
    assert (status["status"], status["reason"], status["step"]) == ("preempted", "SIGTERM",
                                                                    stopped)

    resumed = run_cli(wd, cache_dir, f"--config.num_steps={STEPS}")
    assert f"from step {stopped}" in resumed.stdout
    assert json.loads((wd / "run_status.json").read_text())["status"] == "finished"

    # same final weights as the uninterrupted run
    got, _, got_step = model_io.load_workdir_params(wd)
    want, _, want_step = model_io.load_workdir_params(reference)
    assert got_step == want_step == STEPS
    chex.assert_trees_all_equal(got, want)
    # the same data stream: every step after the resume saw the same batch (same loss)
    ref, mine = train_losses(reference), train_losses(wd)
    assert set(mine) == set(ref) == set(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert mine[step]["loss"] == ref[step]["loss"], step
        assert mine[step]["tokens"] == ref[step]["tokens"], step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, cache_dir, reference):
    steps = 10
    wd = tmp_path / "run"
    port = free_port()
    procs = [subprocess.Popen(
        command(wd, cache_dir, f"--config.num_steps={steps}", "--config.checkpoint_every=5",
                "--config.mesh.shape=2,1,1", "--config.distributed.enabled=True",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
        cwd=REPO, env=env_one_device(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es)" in outs[0]
    assert model_io.workdir_steps(wd) == [5, 10]
    two, one = train_losses(wd), train_losses(reference)
    assert sorted(two) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert two[step]["tokens"] == one[step]["tokens"]
        for key in ("loss", "loss/exit_1", "loss/exit_2", "grad_norm"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5), (step, key)

    # One process restores the 2-process checkpoint onto a different mesh (fsdp x tensor on 4
    # devices): the same values as the raw arrays on disk, really split across devices.
    import flax.linen as nn

    from sorted_jax.model import modeling
    from sorted_jax.parallel import sharding
    from sorted_jax.training import train_step
    from sorted_jax.training.checkpoint import Checkpointer

    if len(jax.devices()) < 4:
        pytest.skip("restoring onto a (1,2,2) mesh needs 4 devices")
    saved, config, _ = model_io.load_workdir_params(wd, 10)
    tx, _ = train_step.make_optimizer(lr=3e-3, total_steps=steps, schedule="constant")
    other = train_step.SoftSteps(modeling.make_model(config), exits=(1, 2), tx=tx,
                                 mesh=sharding.make_mesh((1, 2, 2), jax.devices()[:4]))
    ckpt = Checkpointer(wd, keep=2)
    restored, data, _ = ckpt.restore(10, nn.unbox(other.abstract_state), other.state_shardings)
    ckpt.close()
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored.params), saved)
    assert int(restored.step) == 10 and data["index"] > 0
    kernel = restored.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.mesh.shape == {"data": 1, "fsdp": 2, "tensor": 2}
    assert not kernel.sharding.is_fully_replicated


# Process 1 is slow to choose its resume step; both log when things happen.
SLOW_SECOND = textwrap.dedent("""
    import json, sys, time
    import jax
    from sorted_jax import train
    from sorted_jax.training import checkpoint_integrity as ci

    log = open(sys.argv[1], "a")
    choose, set_aside = ci.choose_resume_step, ci.set_aside_after

    def slow_choose(*args, **kwargs):
        out = choose(*args, **kwargs)
        if jax.process_index() == 1:
            time.sleep(8)
        log.write(json.dumps({"event": "chose", "process": jax.process_index(),
                              "t": time.time()}) + "\\n")
        log.flush()
        return out

    def logged_set_aside(*args, **kwargs):
        log.write(json.dumps({"event": "set_aside", "t": time.time()}) + "\\n")
        log.flush()
        return set_aside(*args, **kwargs)

    ci.choose_resume_step, ci.set_aside_after = slow_choose, logged_set_aside
    sys.exit(train.main(["train", *sys.argv[2:]]))
""")


def two_processes(wd, cache_dir, *extra, script=None, log=None):
    port = free_port()
    args = [command(wd, cache_dir, *extra, "--config.mesh.shape=2,1,1",
                    "--config.distributed.enabled=True",
                    f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                    "--config.distributed.num_processes=2",
                    f"--config.distributed.process_id={i}") for i in range(2)]
    if script is not None:  # the same arguments, through `script`
        args = [[sys.executable, "-c", script, str(log), *a[3:]] for a in args]
    procs = [subprocess.Popen(a, cwd=REPO, env=env_one_device(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in args]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


def test_two_processes_one_lock_and_a_barrier_before_set_aside(tmp_path, cache_dir):
    """A 2-process run takes one workdir lock (process 0's): held by another writer, both
    processes stop at once, process 0 naming the holder. A 2-process resume that sets a damaged
    step aside waits until every process has chosen its step: a slow process 1 does not find
    the step dirs moving under it."""
    from sorted_jax.io import destinations

    wd = tmp_path / "run"
    steps = ["--config.num_steps=10", "--config.checkpoint_every=5"]
    for rc, out, err in two_processes(wd, cache_dir, *steps):
        assert rc == 0, out[-2000:] + err[-3000:]
    assert model_io.workdir_steps(wd) == [5, 10]

    held = destinations.claim_dir(wd, flag="--workdir", command="sorted_jax.train",
                                  resume=True)
    try:
        (rc0, out0, err0), (rc1, out1, err1) = two_processes(wd, cache_dir, *steps)
    finally:
        held.release()
    assert (rc0, rc1) == (2, 2), (err0[-2000:], err1[-2000:])
    assert f"is being written by sorted_jax.train (PID {os.getpid()}" in err0, err0[-2000:]
    assert "process(es) [0] of this run refused to start" in err1, err1[-2000:]

    state = wd / "checkpoints" / "10" / "state"
    biggest = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    log = tmp_path / "events.jsonl"
    for rc, out, err in two_processes(wd, cache_dir, *steps, script=SLOW_SECOND, log=log):
        assert rc == 0, out[-2000:] + err[-3000:]
    events = [json.loads(x) for x in log.read_text().splitlines()]
    chose = {e["process"]: e["t"] for e in events if e["event"] == "chose"}
    (aside,) = [e["t"] for e in events if e["event"] == "set_aside"]
    assert set(chose) == {0, 1} and aside > chose[1], events  # after the slow one chose
    assert model_io.workdir_steps(wd) == [5, 10]
    assert len(list((wd / "set_aside").glob("*/10"))) == 1
