""".ci/run on a machine where shellcheck cannot be installed: CI fails there, instead of the
launch scripts' shellcheck test skipping silently. Every tool .ci/run calls is a stand-in that
records its arguments (nothing is installed, linted or tested for real)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CI = REPO / ".ci" / "run"


def fake_tools(tmp_path: Path, *, shellcheck: bool) -> tuple[Path, Path]:
    """A PATH of stand-ins: python, ruff and (optionally) shellcheck record their calls;
    apt-get fails, as on a machine without network or root."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("dirname", "mktemp"):  # what the script itself needs from coreutils
        real = shutil.which(tool)
        if real is None:
            pytest.skip(f"{tool} is not installed")
        (bin_dir / tool).symlink_to(real)
    record = ('#!/bin/sh\necho "$(basename "$0") $* '
              'REQUIRE=${SORTED_JAX_REQUIRE_SHELLCHECK:-}" >> ' + str(log) + "\n")
    tools = {"python": record, "ruff": record, "basename": None,
             "apt-get": "#!/bin/sh\necho 'E: Could not open lock file' >&2\nexit 100\n"}
    if shellcheck:
        tools["shellcheck"] = record
    for name, text in tools.items():
        if text is None:
            (bin_dir / name).symlink_to(shutil.which(name))
            continue
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


def run_ci(bin_dir: Path) -> subprocess.CompletedProcess:
    bash = shutil.which("bash")
    env = {"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([bash, str(CI)], env=env, capture_output=True, text=True, timeout=60)


def test_ci_fails_when_shellcheck_cannot_be_installed(tmp_path):
    bin_dir, log = fake_tools(tmp_path, shellcheck=False)
    proc = run_ci(bin_dir)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "shellcheck is not installed and could not be installed" in proc.stderr
    calls = log.read_text().splitlines()
    assert calls and all(c.startswith("python -m pip install") for c in calls), calls
    assert not any("pytest" in c or c.startswith("ruff") for c in calls), calls


def test_ci_with_shellcheck_runs_the_tests_requiring_it(tmp_path):
    bin_dir, log = fake_tools(tmp_path, shellcheck=True)
    proc = run_ci(bin_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    assert any(c.startswith("ruff check .") for c in calls), calls
    # pytest runs with the flag that turns the shellcheck test's skip into a failure
    assert "python -m pytest -q REQUIRE=1" in calls, calls
