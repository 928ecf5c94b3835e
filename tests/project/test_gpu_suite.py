"""bench/gpu_suite.sh, the GPU suite, kept from rotting between (rare) GPU runs.

Its CPU dry run runs every step end to end at tiny sizes (same scripts, same flags but the
shapes); the checks are on the JSON lines: every step present, figures finite and positive where
they must be, stdout identical to results.jsonl. Failing and skipped steps are run too, with a
stand-in python that fails and with a zero time budget. Numbers themselves are not checked: a
tiny CPU run says nothing about an H200.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "bench" / "gpu_suite.sh"
WHEELS = REPO / "bench" / "gpu_wheels.sh"
STEPS = ["env", "train_1b", "train_1b_tuned", "decode", "train_tiny"]
PEER_PATHS = [REPO / ".gpu_carry" / "peer_soft_torch.py",
              REPO.parent / "shared" / "bench" / "peer_soft_torch.py"]
DRY_RUN_TIMEOUT = 280  # the suite's own dry-run budget is 300 s; it takes ~1.5 min


def suite_env() -> dict[str, str]:
    # Not the conftest's 8 fake devices nor a developer's JAX settings: the suite sets its own.
    return {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}


def run_suite(out: Path, *args: str, timeout: float = 60, env=None):
    proc = subprocess.run(["bash", str(SUITE), f"--out={out}", *args], capture_output=True,
                          text=True, timeout=timeout, env=env or suite_env(), cwd=REPO)
    lines = [json.loads(s) for s in proc.stdout.splitlines()]
    return proc, lines


def by_figure(lines: list[dict], step: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in lines:
        if r["step"] == step:
            out.setdefault(r["figure"], []).append(r)
    return out


def positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def check_stdout_is_results(proc, out: Path) -> None:
    """Every stdout line is a JSON figure line, the same text as in results.jsonl."""
    assert proc.stdout.strip(), proc.stderr[-3000:]
    assert (out / "results.jsonl").read_text() == proc.stdout


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    proc, lines = run_suite(out, "--dry-run", timeout=DRY_RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, lines


def test_dry_run_every_step_ok(dry_run):
    out, proc, lines = dry_run
    check_stdout_is_results(proc, out)
    for r in lines:
        assert r["dry_run"] is True and r["elapsed_s"] >= 0 and r["figure"], r
    errors = [r for r in lines if r["figure"] in ("error", "skipped")]
    assert not errors, errors
    done = lines[-1]
    assert done["figure"] == "done" and done["step"] == "suite"
    assert set(done["ok"]) == {"wheels", *STEPS}
    assert not done["partial"] and not done["failed"] and not done["skipped"]
    assert done["wall_s"] < DRY_RUN_TIMEOUT
    # The device tool brings back at most 8 files: the suite writes three.
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "suite.log",
                                                     "tiny_exit_table.md"]
    assert "## train_1b (exit 0)" in (out / "suite.log").read_text()


def test_dry_run_env(dry_run):
    figs = by_figure(dry_run[2], "env")
    env, matmul = figs["environment"][0], figs["matmul"][0]
    assert env["backend"] == "cpu" and env["device_count"] == 1
    assert env["versions"]["jax"] and env["versions"]["ml-collections"]
    assert positive(matmul["matmul_tflops"]) and matmul["matmul_dtype"] == "bfloat16"


@pytest.mark.parametrize("step", ["train_1b", "train_1b_tuned"])
def test_dry_run_train_step(dry_run, step):
    figs = by_figure(dry_run[2], step)
    assert step != "train_1b_tuned" or "--remat dots_with_no_batch_dims_saveable" in \
        figs["command"][0]["command"]
    for mode in ("sft", "soft4"):
        (row,) = figs[f"sorted_jax/{mode}"]
        for key in ("step_s", "tok_per_s", "compiled_temp_GiB"):
            assert positive(row[key]), (key, row)
        # model TFLOP/s over the env step's matmul rate (0.0 TFLOP/s rounded on a slow CPU).
        assert row["model_tflops"] == 0 or positive(row["mfu_vs_matmul"]), row
        assert row["peak_mem_GiB"] is None  # CPU: no allocator statistics
    (summary,) = figs["summary"]
    assert positive(summary["soft_over_sft_time"])
    assert summary["soft_over_sft_flops_theory"] > 1


def test_dry_run_peer(dry_run):
    figs = by_figure(dry_run[2], "train_1b")
    if not any(p.is_file() for p in PEER_PATHS):
        assert "peer_missing" in figs  # said, not silently left out
        pytest.skip(f"peer script not found at {' or '.join(map(str, PEER_PATHS))}")
    assert "--peer-script" in figs["command"][0]["command"]
    for mode in ("sft", "soft4"):
        (row,) = figs[f"torch-hf/{mode}"]
        assert row["dtype"] == "float32" and positive(row["tok_per_s"]), row
        assert row["peak_mem_GiB"] is None  # NaN on CPU, made strict JSON
        assert positive(figs["summary"][0][f"ours_over_peer_tok_per_s_{mode}"])
    targets = dry_run[2][-2]
    assert targets["figure"] == "targets"
    assert positive(targets["train_1b"]["soft_tok_per_s_over_peer"])
    assert targets["train_1b"]["met"]["peak_mem"] is None  # no peak memory on CPU


def test_dry_run_decode(dry_run):
    figs = by_figure(dry_run[2], "decode")
    assert "L=2" in figs["decode_model"][0]["model"]
    assert "bfloat16" in figs["decode_model"][0]["model"]
    assert positive(figs["decode_full"][0]["tokens_per_s"])
    # CPU timings of a tiny model are noise: only finite and non-negative.
    assert [r["k"] for r in figs["decode_fixed"]] == [1, 2]
    assert [r["k_over_L"] for r in figs["decode_fixed"]] == [0.5, 1.0]
    (spec,) = figs["decode_speculative"]
    assert spec["draft_layer"] == 1 and 0 <= spec["acceptance"] <= 1 and spec["full_passes"] > 0
    ee = figs["decode_early_exit"]
    assert [r["thresholds"].split()[0] for r in ee] == ["paper", "never", "median@1", "all"]
    for r in [*figs["decode_fixed"], spec, *ee]:
        assert math.isfinite(r["ms_per_token"]) and r["ms_per_token"] >= 0, r
    assert set(dry_run[2][-2]["decode"]["decode_cost_minus_bound"]) == {"1", "2"}


def test_dry_run_train_tiny(dry_run):
    out, _, lines = dry_run
    (row,) = by_figure(lines, "train_tiny")["train_wall"]
    assert positive(row["wall_s"]) and row["steps"] == 2
    assert positive(row["train_tokens_per_s"])
    assert sorted(row["eval_loss"], key=int) == ["2", "4", "6", "8"]
    assert all(positive(v) for v in row["eval_loss"].values())
    assert "exit" in (out / "tiny_exit_table.md").read_text()


def test_zero_budget_skips_every_step(tmp_path):
    proc, lines = run_suite(tmp_path, "--dry-run", "--budget=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_stdout_is_results(proc, tmp_path)
    skipped = {r["step"]: r["skipped"] for r in lines if r["figure"] == "skipped"}
    assert list(skipped) == STEPS and "budget" in skipped["env"]
    assert lines[-1]["skipped"] == STEPS


def test_failing_steps_are_recorded_and_the_suite_goes_on(tmp_path):
    """A python that fails everything but the recorder: each step writes an error line with
    its log's tail, and the suite still ends with its targets and done lines."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\ncase "$*" in\n  *gpu_record.py*) exec python3 "$@" ;;\n'
                    '  *) echo "fake python: no $*" >&2; exit 3 ;;\nesac\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc, lines = run_suite(out, "--dry-run", env={**suite_env(), "PYTHON": str(fake)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_stdout_is_results(proc, out)
    errors = {r["step"]: r for r in lines if r["figure"] == "error"}
    assert set(STEPS) <= set(errors)
    assert errors["decode"]["error"] == "exit 3"
    assert any("fake python: no" in s for s in errors["decode"]["log_tail"])
    assert lines[-2]["figure"] == "targets" and set(lines[-1]["failed"]) >= set(STEPS)


def test_recorder_timeout_message_and_targets(tmp_path):
    """The timeout wording, and the targets computed from GPU-like lines (the DESIGN's peer)."""
    spec = importlib.util.spec_from_file_location("gpu_record", REPO / "bench" / "gpu_record.py")
    rec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rec)
    rec.main(["error", "--out", str(tmp_path), "--step", "decode", "--rc", "124",
              "--timeout", "150"])
    line = json.loads((tmp_path / "results.jsonl").read_text())
    assert line["error"] == "timed out after 150.0 s (exit 124)"

    rows = [
        {"step": "train_1b", "impl": "sorted_jax", "mode": "sft", "tok_per_s": 70000},
        {"step": "train_1b", "impl": "sorted_jax", "mode": "soft8", "tok_per_s": 56000,
         "peak_mem_GiB": 37.0},
        {"step": "train_1b", "impl": "torch-hf-compile", "mode": "sft", "tok_per_s": 57800},
        {"step": "train_1b", "impl": "torch-hf-compile", "mode": "soft8", "tok_per_s": 44600,
         "peak_mem_GiB": 62.5},
        {"step": "train_1b", "figure": "summary", "soft_over_sft_time": 1.25,
         "soft_over_sft_flops_theory": 1.41},
        {"step": "decode", "figure": "decode_fixed", "k": 4, "cost_vs_full": 0.3,
         "k_over_L": 0.25},
        {"step": "decode", "figure": "decode_fixed", "k": 8, "cost_vs_full": 0.7,
         "k_over_L": 0.5},
    ]
    t = rec.targets(rows)
    assert t["train_1b"]["soft_tok_per_s_over_peer"] == round(56000 / 44600, 3)
    assert t["train_1b"]["met"] == {"tok_per_s": True, "peak_mem": True, "soft_over_sft": False}
    assert t["decode"] == {"decode_cost_minus_bound": {4: -0.05, 8: 0.1}, "met": False}
    assert "train_1b_tuned" not in t and "peer" not in t
    assert rec.targets(rows[:2])["peer"].startswith("no peer figures")


def test_help_and_bad_arguments():
    help_text = subprocess.run(["bash", str(SUITE), "--help"], capture_output=True, text=True,
                               timeout=30).stdout
    assert "--dry-run" in help_text and "--budget" in help_text and "set -uo" not in help_text
    bad = subprocess.run(["bash", str(SUITE), "--frobnicate"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


@pytest.mark.parametrize("script", [SUITE, WHEELS], ids=lambda p: p.name)
def test_shellcheck(script):
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    proc = subprocess.run([exe, "--shell=bash", "--external-sources", str(script)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
