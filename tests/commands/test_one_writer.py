"""One writer per workdir, with two real `python -m sorted_jax.train` processes: the second one
on a workdir the first is writing exits 2 naming it, and the first finishes unharmed; a kill -9
of the first leaves a workdir the next run takes (and a run_status.json that names the last
checkpoint on disk, not step 0)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import REPO, TINY_CONFIG_FILE, TRAIN_SMALL

from sorted_jax.io import model_io
from sorted_jax.training import metrics_log, run_status


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def command(workdir, cache_dir, *extra):
    return [sys.executable, "-m", "sorted_jax.train", f"--config={TINY_CONFIG_FILE}",
            f"--workdir={workdir}", *TRAIN_SMALL, "--config.data.eval=none",
            "--config.eval_every=0", f"--config.compilation_cache_dir={cache_dir}", *extra]


def env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def start(workdir, cache_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen(command(workdir, cache_dir, *extra), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the first run ended early:\n{out[-2000:]}\n{err[-3000:]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def logged_steps(workdir) -> list[int]:
    f = workdir / metrics_log.METRICS_FILE
    if not f.is_file():
        return []
    return [json.loads(x)["step"] for x in f.read_text().splitlines() if x.strip()]


def error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.replace("\r", "\n").splitlines()
            if x.strip() and not x.startswith("train:")]


def test_a_second_train_on_a_busy_workdir_is_refused(tmp_path, cache_dir):
    wd = tmp_path / "run"
    steps = 3000  # ~5x the time a second train needs to start and be refused (measured)
    first = start(wd, cache_dir, f"--config.num_steps={steps}", "--config.log_every=1",
                  "--config.checkpoint_every=1000")
    try:
        wait_for(lambda: len(logged_steps(wd)) >= 2, first)  # the first is training
        before = (wd / "train_config.json").read_bytes()
        second = subprocess.run(command(wd, cache_dir, f"--config.num_steps={steps}",
                                        "--config.log_every=1", "--config.seed=7"),
                                cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run must still be writing: make it longer"
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-3000:]
    lines = error_lines(second.stderr)
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(
        f"sorted_jax.train: error: --workdir {wd} is being written by sorted_jax.train (PID "
        f"{first.pid} on host {socket.gethostname()}, since "), lines[0]
    assert second.stdout == ""  # it did nothing: not even a "resuming" line

    # the first finished unharmed: every step logged once, its own config, its checkpoints
    assert first.returncode == 0, out[-2000:] + err[-3000:]
    assert (wd / "train_config.json").read_bytes() == before
    assert json.loads(before)["seed"] == 0
    train_rows = [r["step"] for r in metrics_log.read_metrics(wd, "train")]
    assert sorted(logged_steps(wd)) == logged_steps(wd) == list(range(1, steps + 1))
    assert train_rows == list(range(1, steps + 1))
    assert model_io.workdir_steps(wd)[-1] == steps
    assert run_status.read(wd)["status"] == run_status.FINISHED
    assert not (wd / ".sorted_jax.lock").exists()  # released at the end


def test_a_kill_9_holder_leaves_a_workdir_the_next_run_takes(tmp_path, cache_dir):
    wd = tmp_path / "run"
    first = start(wd, cache_dir, "--config.num_steps=100000", "--config.log_every=1",
                  "--config.checkpoint_every=20")
    try:
        # a checkpoint is on disk once run_status.json records it (not at step 0)
        wait_for(lambda: run_status.read(wd).get("step", 0) >= 40, first)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    status = run_status.read(wd)
    on_disk = model_io.workdir_steps(wd)
    assert status["status"] == run_status.RUNNING  # the killed run could not say more
    assert status["step"] in on_disk and status["step"] >= 40, (status, on_disk)
    assert (wd / ".sorted_jax.lock").exists()  # the file is left; its lock went with the process

    newest = on_disk[-1]
    resumed = subprocess.run(command(wd, cache_dir, f"--config.num_steps={newest + 5}",
                                     "--config.log_every=1", "--config.checkpoint_every=20"),
                             cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"from step {newest}" in resumed.stdout
    assert run_status.read(wd)["status"] == run_status.FINISHED
    assert model_io.workdir_steps(wd)[-1] == newest + 5
