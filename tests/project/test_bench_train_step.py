"""bench/train_step.py measures each exit set in a process of its own: a device's peak memory
cannot be reset, so the SoFT row of one invocation used to include the SFT run's peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_each_exit_set_is_measured_in_its_own_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "bench/train_step.py", "--size", "tiny", "--batch", "2", "--seq", "32",
         "--steps", "1", "--warmup", "1", "--no-peer"], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    lines = out.splitlines()
    assert lines[0].startswith("# backend cpu"), out
    rows = [json.loads(x) for x in lines if x.startswith("{")]
    modes = {r["mode"]: r for r in rows if "mode" in r}
    assert set(modes) == {"sft", "soft4"}, out
    pids = {r["pid"] for r in modes.values()}
    assert len(pids) == 2 and proc.pid not in pids  # one fresh process each, not this one's
    assert modes["soft4"]["exits"] == [1, 2, 3, 4] and modes["sft"]["exits"] == [4]
    summary = rows[-1]["summary"]
    assert summary["soft_over_sft_flops_theory"] > 1 and summary["soft_over_sft_time"] > 0
