"""`WORKDIR/run_status.json`: how the last launch of a run ended, for launchers and people.

    {"status": "finished" | "preempted" | "failed" | "running", "step": 120, "total_steps": 400,
     "reason": "SIGTERM", "time": 1765000000.0}

A SIGTERM / SIGINT stop exits 0 like a finished run (the checkpoint is saved and the same
command resumes), so the exit status alone cannot tell them apart: this file can. "running"
left behind means the process died without cleaning up (kill -9, a crashed host).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

RUN_STATUS_FILE = "run_status.json"
RUNNING, FINISHED, PREEMPTED, FAILED = "running", "finished", "preempted", "failed"


def write(workdir: Path, status: str, step: int, total_steps: int, reason: str = "") -> None:
    """Replace the status file atomically."""
    path = Path(workdir) / RUN_STATUS_FILE
    data: dict[str, Any] = {"status": status, "step": int(step), "total_steps": int(total_steps),
                            "reason": reason, "time": round(time.time(), 3)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read(workdir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(workdir) / RUN_STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
