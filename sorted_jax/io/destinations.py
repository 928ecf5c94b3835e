"""Where a command writes: checked before it reads or computes anything, never a user's file lost.

Every command that writes asks this module first (train's `--workdir`, the `--out` of
`convert`, `ict`, `evaluate` and `generate`):

    dest = destinations.claim_dir(args.out, flag="--out", command=COMMAND,
                                  inputs=[args.hf], overwrite=args.overwrite,
                                  recognise=model_io.is_model_dir)
    ...                                   # load, compute
    with destinations.atomic_dir(dest) as tmp:
        write(tmp)                        # becomes dest.path, with the command's marker

A destination is refused (a `DestinationError`, one line) when

- it is one of the command's inputs, lies inside one, or holds one (symlinks resolved):
  replacing it would delete what the command is reading;
- something above it is a file, or it is a file where a dir belongs (or the reverse);
- it holds something the command did not write. What a command wrote is known by the
  marker file `MARKER` it leaves in every dir it writes (`{"command": ...}`), or, for outputs
  written before markers existed, by the command's own layout (`recognise`);
- it holds the command's own earlier output and `--overwrite` was not given (train instead
  resumes its own workdir: `resume=True`).

One writer at a time: a claim takes an exclusive lock (`writer_lock`, an OS `flock` the kernel
releases when the process dies) on `DEST/.sorted_jax.lock` for a dir written in place (train's
workdir, `resume=True`) or on `PARENT/.NAME.lock` beside any other destination, and checks the
destination again once it holds it. A second writer is refused naming the holder (PID, host,
since when). `atomic_dir` / `atomic_file` release it when done (`Destination.release()` too);
pass `lock=False` where another process of the same run holds it.

`atomic_dir` writes into a temp sibling `.NAME.tmp-PID@HOST-RAND` and renames it into place (the
old output, if any, is moved aside first, then removed), so a crash leaves either the old
output or the new one. Temp siblings of processes that no longer run (a kill -9) are removed
by the next write into the same parent. Directories are created with the umask's mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from sorted_jax.core.errors import DestinationError, ModelIOError
from sorted_jax.io import writer_lock
from sorted_jax.io.writer_lock import LOCK_FILE, WriterLock

__all__ = ["LOCK_FILE", "MARKER", "Destination", "DestinationError", "atomic_dir", "atomic_file",
           "claim_dir", "claim_file", "clean_stale_temps", "jsonl_with_keys", "read_marker",
           "require_filesystem_path", "url_scheme"]

MARKER = ".sorted_jax.json"
# .NAME.tmp-PID@HOST-RAND (this module's), or .NAME.tmp-XXXXXXXX (tempfile.mkdtemp's, before)
_TEMP = re.compile(r"^\..+\.(?:tmp|old)-(?:(\d+)@(.+)-[0-9a-f]{8}|[A-Za-z0-9_]{8})$")
_FOREIGN_HOST_STALE_S = 24 * 3600  # another host's temp dir: stale once this old

Recognise = Callable[[Path], bool]


def url_scheme(path: str | os.PathLike) -> str | None:
    """'gs' for 'gs://bucket/x' (any 'scheme://' prefix), None for a filesystem path."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", str(path))
    return m.group(1) if m else None


def require_filesystem_path(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path, refusing URLs: pathlib would turn 'gs://b/x' into a local './gs:/b/x'
    and a run would silently write its checkpoints to one machine's disk."""
    scheme = url_scheme(path)
    if scheme is not None:
        hint = (" Mount the bucket on every host (e.g. `gcsfuse --implicit-dirs BUCKET "
                "/mnt/BUCKET`) and pass /mnt/BUCKET/PATH." if scheme == "gs" else "")
        raise ModelIOError(f"{what}={str(path)!r}: {scheme}:// URLs are not supported; sorted_jax "
                           f"reads and writes through the filesystem.{hint}")
    return Path(path)


@dataclasses.dataclass(frozen=True)
class Destination:
    """A checked destination: where to write, and whether the command's own output is there."""

    path: Path  # absolute, symlinks resolved
    flag: str
    command: str
    own: bool  # holds this command's earlier output (to resume, or to replace)
    lock: WriterLock | None = dataclasses.field(default=None, compare=False, repr=False)

    def release(self) -> None:
        """Let another writer have the destination (the lock, if this claim took one)."""
        if self.lock is not None:
            self.lock.release()


def lock_path(dest: Path, inside: bool) -> Path:
    """The lock file of a destination: inside a dir written in place, else beside it."""
    return dest / LOCK_FILE if inside else dest.parent / f".{dest.name}.lock"


def _locked(dest: Destination, inside: bool, check: Callable[[], Destination]) -> Destination:
    """`dest` with its writer lock taken, checked again now that nobody else writes there."""
    lock = writer_lock.acquire(lock_path(dest.path, inside), what=f"{dest.flag} {dest.path}",
                               command=dest.command)
    try:
        return dataclasses.replace(check(), lock=lock)
    except BaseException:
        lock.release()
        raise


def read_marker(path: Path) -> str | None:
    """The command that wrote dir `path` (its marker), or None."""
    try:
        return str(json.loads((path / MARKER).read_text())["command"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def jsonl_with_keys(*keys: str) -> Recognise:
    """A `recognise` for a JSON-lines output file: its first line is an object with `keys`
    (files carry no marker, so a command knows its own output by its records' shape)."""
    def recognise(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as f:
                first = json.loads(f.readline() or "null")
        except (OSError, ValueError):
            return False
        return isinstance(first, dict) and set(keys) <= first.keys()

    return recognise


def write_marker(path: Path, command: str) -> None:
    (path / MARKER).write_text(json.dumps({"command": command}) + "\n")


def _resolved(path: str | os.PathLike, flag: str) -> Path:
    return require_filesystem_path(path, flag).expanduser().absolute().resolve()


def _check_inputs(dest: Path, flag: str, inputs: Iterable[str | os.PathLike | None],
                  allow_inside: bool) -> None:
    for raw in inputs:
        if not raw or url_scheme(raw) is not None or not Path(raw).expanduser().exists():
            continue  # builtin / tfds: specs, not paths; nothing there to protect
        src = Path(raw).expanduser().absolute().resolve()
        if dest == src or src in dest.parents:
            raise DestinationError(f"{flag} {dest} is (inside) the input {src}: writing there "
                                   "would damage the input; choose another path")
        if dest in src.parents and not allow_inside:
            raise DestinationError(f"{flag} {dest} holds the input {src}: writing there would "
                                   "delete it; choose another path")


def _check_parents(dest: Path, flag: str) -> None:
    for parent in dest.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DestinationError(f"{flag} {dest}: {parent} is a file, not a directory")
            return


def claim_dir(path: str | os.PathLike, *, flag: str, command: str,
              inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False,
              resume: bool = False, recognise: Recognise | None = None,
              lock: bool = True) -> Destination:
    """Check a directory destination before any work and take its writer lock (see the module
    doc for the rules)."""
    def check() -> Destination:
        return _check_dir(path, flag, command, inputs, overwrite, resume, recognise)

    return _locked(check(), resume, check) if lock else check()


def _check_dir(path: str | os.PathLike, flag: str, command: str,
               inputs: Iterable[str | os.PathLike | None], overwrite: bool, resume: bool,
               recognise: Recognise | None) -> Destination:
    dest = _resolved(path, flag)
    _check_parents(dest, flag)
    if dest.exists() and not dest.is_dir():
        raise DestinationError(f"{flag} {dest} is a file; give a directory path")
    entries = sorted(p.name for p in dest.iterdir() if p.name != LOCK_FILE) \
        if dest.is_dir() else []
    own = bool(entries) and (read_marker(dest) == command
                             or (recognise is not None and recognise(dest)))
    _check_inputs(dest, flag, inputs, allow_inside=own and resume)
    if entries and not own:
        by = read_marker(dest)
        what = f"it was written by {by}" if by else f"it holds {entries[:8]}"
        raise DestinationError(f"{flag} {dest} is not an output of {command} ({what}); nothing "
                               "there is replaced: choose a new or empty directory")
    if own and not (resume or overwrite):
        raise DestinationError(f"{flag} {dest} already holds an earlier output of {command}; "
                               "pass --overwrite to replace it, or choose another path")
    return Destination(dest, flag, command, own)


def claim_file(path: str | os.PathLike, *, flag: str, command: str,
               inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False,
               recognise: Recognise | None = None, lock: bool = True) -> Destination:
    """Check a file destination before any work: not a dir, not an input, and an existing
    file only when `recognise` says this command wrote it and `overwrite` is set; then take its
    writer lock."""
    def check() -> Destination:
        return _check_file(path, flag, command, inputs, overwrite, recognise)

    return _locked(check(), False, check) if lock else check()


def _check_file(path: str | os.PathLike, flag: str, command: str,
                inputs: Iterable[str | os.PathLike | None], overwrite: bool,
                recognise: Recognise | None) -> Destination:
    dest = _resolved(path, flag)
    _check_parents(dest, flag)
    if dest.is_dir():
        raise DestinationError(f"{flag} {dest} is a directory; give a file path")
    _check_inputs(dest, flag, inputs, allow_inside=False)
    own = dest.is_file() and recognise is not None and recognise(dest)
    if dest.exists() and not own:
        raise DestinationError(f"{flag} {dest} exists and is not an output of {command}; it is "
                               "not replaced: choose another path")
    if own and not overwrite:
        raise DestinationError(f"{flag} {dest} already holds an earlier output of {command}; "
                               "pass --overwrite to replace it, or choose another path")
    return Destination(dest, flag, command, own)


# ---------------------------------------------------------------------------------------------
# writing


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(m: re.Match, path: Path) -> bool:
    if m.group(1) is None:  # an older version's name: nothing can tell; a killed run's
        return True
    if m.group(2) == socket.gethostname():
        return not _pid_alive(int(m.group(1)))
    return time.time() - path.stat().st_mtime > _FOREIGN_HOST_STALE_S


def clean_stale_temps(parent: Path) -> list[Path]:
    """Remove temp siblings (`.NAME.tmp-PID@HOST-RAND`, `.NAME.old-...`) left by processes
    that no longer run (a kill -9): on this host by their pid, another host's after a day."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _TEMP.match(p.name)
        if m and p.is_dir() and _is_stale(m, p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def make_dirs(path: Path) -> None:
    """`mkdir -p` with the umask's mode (what `tempfile.mkdtemp`'s 0700 is not)."""
    path.mkdir(parents=True, exist_ok=True)


def _temp_sibling(out: Path, kind: str) -> Path:
    tmp = out.parent / f".{out.name}.{kind}-{os.getpid()}@{socket.gethostname()}-" \
                       f"{secrets.token_hex(4)}"
    os.mkdir(tmp)  # mode 0o777 & ~umask
    return tmp


@contextlib.contextmanager
def atomic_dir(dest: Destination | str | os.PathLike, overwrite: bool = False
               ) -> Iterator[Path]:
    """Yield a fresh temp dir beside the destination; on success it becomes the destination
    (with the command's marker when `dest` is a `Destination`, whose writer lock is released
    at the end). On any exception the temp dir is removed and the destination is left as it
    was."""
    with _releasing(dest):
        yield from _atomic_dir(dest, overwrite)


@contextlib.contextmanager
def _releasing(dest: Any) -> Iterator[None]:
    try:
        yield
    finally:
        if isinstance(dest, Destination):
            dest.release()


def _atomic_dir(dest: Destination | str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    if not isinstance(dest, Destination):  # library callers: plain path, old semantics
        out = require_filesystem_path(dest, "output").absolute()
        if out.exists() and not overwrite:
            raise DestinationError(f"output {out} already exists; remove it or choose another "
                                   "path (or pass overwrite=True / --overwrite)")
        command = None
    else:
        out, command = dest.path, dest.command
    make_dirs(out.parent)
    clean_stale_temps(out.parent)
    tmp = _temp_sibling(out, "tmp")
    try:
        yield tmp
        if command is not None:
            write_marker(tmp, command)
        if out.exists():  # overwrite: move the old one aside, then swap
            old = _temp_sibling(out, "old")
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dest: Destination, mode: str = "w") -> Iterator:
    """An open temp sibling of the destination file, renamed over it once closed without error
    (the destination's writer lock is released at the end)."""
    with _releasing(dest):
        yield from _atomic_file(dest, mode)


def _atomic_file(dest: Destination, mode: str) -> Iterator:
    out = dest.path
    make_dirs(out.parent)
    tmp = out.parent / f".{out.name}.part-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
