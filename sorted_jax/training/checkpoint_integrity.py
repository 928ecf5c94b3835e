"""Can a saved training step be trusted? A small manifest per step, checked before a resume.

Orbax makes a step appear only once it is complete, but a step can still be damaged later (a
truncated tensor file, a deleted `_METADATA` or item dir) or hold weights that already
diverged. Each step therefore gets a manifest beside Orbax's dir:

    WORKDIR/checkpoint_manifests/<step>.json
        {"step": 6,
         "files": {"state/_METADATA": 15498, ...},     # every file and its size, once saved
         "health": "good" | "diverged" | "unchecked",  # were loss and gradient norm finite
         "health_detail": "loss 2.31, grad_norm 0.87 at these weights (step 7)"}

The health of step k is the loss and gradient norm computed *at its weights*, i.e. those of
step k + 1: a step whose update was fine can still hold weights whose gradient is NaN. A step
saved last (end of run, SIGTERM) stays "unchecked" until a resumed run computes step k + 1.

`problem(workdir, step)` is the cheap check a resume runs: the files Orbax needs are there
and, with a manifest, every file has its recorded size; a "diverged" step is refused too.
Steps written before manifests existed are checked by their structure alone. A manifest that
exists but cannot be read (truncated, overwritten) is not taken as "no manifest": the step's
health is unknown (it may be one that diverged), so a resume passes over it like a damaged
one, saying so; `--config.resume_step=N` still takes it, with a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from sorted_jax.core.errors import CheckpointError
from sorted_jax.io.model_io import CHECKPOINTS_DIR, DATA_ITEM, META_ITEM, STATE_ITEM

MANIFEST_DIR = "checkpoint_manifests"
SET_ASIDE_DIR = "set_aside"  # checkpoints newer than the step a run resumed from
GOOD, DIVERGED, UNCHECKED = "good", "diverged", "unchecked"
UNKNOWN = "unknown"  # the manifest exists but cannot be read
# What Orbax needs to restore a step of our layout (a manifest also pins every file's size).
REQUIRED = ("_CHECKPOINT_METADATA", f"{STATE_ITEM}/_METADATA", f"{STATE_ITEM}/manifest.ocdbt",
            f"{DATA_ITEM}/metadata", f"{META_ITEM}/metadata")


def step_dir(workdir: Path, step: int) -> Path:
    return Path(workdir) / CHECKPOINTS_DIR / str(step)


def manifest_path(workdir: Path, step: int) -> Path:
    return Path(workdir) / MANIFEST_DIR / f"{step}.json"


def read(workdir: Path, step: int) -> dict[str, Any]:
    """The manifest of `step`: {} when it has none; {"unreadable": why} when it exists but
    cannot be read (a truncated or overwritten file): its health is then unknown, not good."""
    path = manifest_path(workdir, step)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        return {"unreadable": f"{path} cannot be read ({type(e).__name__})"}
    if not isinstance(data, dict):
        return {"unreadable": f"{path} is not a manifest (a {type(data).__name__})"}
    return data


def _update(workdir: Path, step: int, **fields: Any) -> None:
    """Merge `fields` into the manifest, atomically (temp file, then rename)."""
    path = manifest_path(workdir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = read(workdir, step)
    data = {**({} if "unreadable" in old else old), "step": int(step), **fields}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def list_files(directory: Path) -> dict[str, int]:
    """{path relative to `directory`: size in bytes} of every file below it."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            p = Path(root) / name
            out[str(p.relative_to(directory))] = p.stat().st_size
    return dict(sorted(out.items()))


def record_files(workdir: Path, step: int) -> None:
    """Pin the files of a finished save (called once Orbax has committed the step)."""
    _update(workdir, step, files=list_files(step_dir(workdir, step)))


def record_health(workdir: Path, step: int, health: str, detail: str = "") -> None:
    _update(workdir, step, health=health, health_detail=detail)


def health(workdir: Path, step: int) -> str:
    m = read(workdir, step)
    return UNKNOWN if "unreadable" in m else str(m.get("health", UNCHECKED))


def prune(workdir: Path, keep_steps: set[int]) -> None:
    """Drop the manifests of steps Orbax no longer keeps."""
    d = Path(workdir) / MANIFEST_DIR
    if not d.is_dir():
        return
    for p in d.glob("*.json"):
        if p.stem.isdigit() and int(p.stem) not in keep_steps:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def problem(workdir: Path, step: int, allow_unknown: bool = False) -> str | None:
    """Why `step` cannot be resumed from (damaged files, diverged weights, an unreadable
    manifest unless `allow_unknown`), or None."""
    d = step_dir(workdir, step)
    missing = [r for r in REQUIRED if not (d / r).is_file()]
    if missing:
        return f"damaged: {', '.join(missing)} missing"
    m = read(workdir, step)
    if "unreadable" in m and not allow_unknown:
        return (f"of unknown health: its manifest {m['unreadable']}, so whether its weights "
                "diverged and whether its files are intact cannot be told")
    files = m.get("files")
    if isinstance(files, dict):
        gone = [f for f in files if not (d / f).is_file()]
        if gone:
            return f"damaged: {len(gone)} file(s) missing, e.g. {gone[0]}"
        changed = [f for f, size in files.items() if (d / f).stat().st_size != size]
        if changed:
            f = changed[0]
            return (f"damaged: {len(changed)} file(s) changed size since the save, e.g. {f} "
                    f"({(d / f).stat().st_size} bytes, saved {files[f]})")
    if m.get("health") == DIVERGED:
        return f"diverged ({m.get('health_detail') or 'non-finite loss or gradient norm'})"
    return None


# ---------------------------------------------------------------------------------------------
# choosing the step to resume from


def choose_resume_step(workdir: Path, steps: list[int], requested: int = -1
                       ) -> tuple[int | None, str | None]:
    """(step to resume from, a note naming the steps passed over, or None).

    `requested` >= 0 (`--config.resume_step`) must be on disk and intact; -1 takes the newest
    intact step, passing over damaged or diverged newer ones."""
    where = Path(workdir) / CHECKPOINTS_DIR
    if requested >= 0:
        if requested not in steps:
            raise CheckpointError(f"resume_step={requested} is not a checkpoint in {where}; "
                                  f"steps on disk: {steps}")
        why = problem(workdir, requested, allow_unknown=True)
        if why is not None:
            raise CheckpointError(f"resume_step={requested}: step {requested} in {where} is "
                                  f"{why}; steps on disk: {steps}")
        later = [s for s in steps if s > requested]
        notes = [f"step {requested} is {problem(workdir, requested)}; resuming from it as "
                 "asked"] if health(workdir, requested) == UNKNOWN else []
        if later:
            notes.append(f"resuming from step {requested} as asked (resume_step); later steps "
                         f"{later} are set aside")
        return requested, "; ".join(notes) or None
    skipped: list[str] = []
    for s in reversed(steps):
        why = problem(workdir, s)
        if why is None:
            note = None if not skipped else (
                f"{'; '.join(skipped)}: resuming from step {s}, the newest intact checkpoint "
                f"(the passed-over steps are set aside in {Path(workdir) / SET_ASIDE_DIR})")
            return s, note
        skipped.append(f"step {s} in {where} is {why}")
    if not steps:
        return None, None
    raise CheckpointError(f"no checkpoint can be resumed: {'; '.join(skipped)}. Start a new "
                          "workdir, or load weights of an intact export with init_from")


def set_aside_after(workdir: Path, step: int) -> list[Path]:
    """Move checkpoints newer than `step` (and their manifests) to `WORKDIR/set_aside/`, so
    the resumed run writes those step numbers afresh; nothing is deleted."""
    src, moved = Path(workdir) / CHECKPOINTS_DIR, []
    if not src.is_dir():
        return moved
    dst = Path(workdir) / SET_ASIDE_DIR / time.strftime("%Y%m%d-%H%M%S")
    for p in sorted(src.iterdir()):
        if p.name.isdigit() and int(p.name) > step:
            dst.mkdir(parents=True, exist_ok=True)
            os.rename(p, dst / p.name)
            m = manifest_path(workdir, int(p.name))
            if m.is_file():
                os.rename(m, dst / f"{p.name}.manifest.json")
            moved.append(dst / p.name)
    return moved
