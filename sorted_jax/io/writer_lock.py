"""One writer per destination: an exclusive `fcntl.flock` on a lock file, held while a command
writes. `destinations.claim_dir` / `claim_file` take it; nothing else needs to.

    lock = writer_lock.acquire(path, what="--workdir /runs/a", command="sorted_jax.train")
    ...                                  # write
    lock.release()                       # or the process ends: the kernel releases it

A flock belongs to the open file, so the kernel releases it when its process dies (kill -9, an
OOM kill): no stale lock is ever left. The file may stay behind; the next writer takes it. Once
it holds the lock, a writer records who it is in the file (`{"pid", "host", "since",
"command"}`), so a refused writer names the holder. On NFS (v4) Linux maps flock onto the
server's byte-range locks, so two hosts writing one shared workdir are refused the same way.

Within one process a destination locked again gets the same lock: one interpreter running a
command twice (tests, a notebook) is one writer, not two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Any

from sorted_jax.core.errors import DestinationError

__all__ = ["LOCK_FILE", "WriterLock", "acquire", "holder_text"]

LOCK_FILE = ".sorted_jax.lock"  # inside a dir a command writes into in place (a workdir)

_HELD: weakref.WeakValueDictionary[str, WriterLock] = weakref.WeakValueDictionary()


@dataclasses.dataclass(eq=False)
class WriterLock:
    """A held lock: `release()` it once the destination is written (or let the process end)."""

    path: Path
    fd: int | None
    created_dir: Path | None = None  # made to hold the lock file; removed on release if empty

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Remove the lock file (while still holding it: a writer waiting on the old file
        notices it is gone and retries) and let go. Idempotent."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self.path, fd):
                os.unlink(self.path)
        os.close(fd)
        if _HELD.get(str(self.path)) is self:
            del _HELD[str(self.path)]
        if self.created_dir is not None:
            with contextlib.suppress(OSError):  # not empty: something was written, keep it
                os.rmdir(self.created_dir)

    def __del__(self) -> None:
        try:  # no contextlib here: at interpreter exit module globals may be gone
            self.release()
        except Exception:  # noqa: BLE001, S110
            pass


def _same_file(path: Path, fd: int) -> bool:
    try:
        a, b = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def holder_text(info: dict[str, Any]) -> str:
    """"sorted_jax.train (PID 123 on host h, since 2025-01-02 03:04:05)", or a plainer
    text when the holder has not written its details yet."""
    if not info.get("pid"):
        return "another process (it has just started)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since", 0))))
    return (f"{info.get('command') or 'another process'} (PID {info['pid']} on host "
            f"{info.get('host', '?')}, since {since})")


def acquire(path: str | os.PathLike, *, what: str, command: str) -> WriterLock:
    """Take the lock file `path` (its dir is made if missing), or raise a `DestinationError`
    naming `what` and the process that holds it."""
    path = Path(path)
    held = _HELD.get(str(path))
    if held is not None and held.held:
        return held
    created = None
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        created = path.parent
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            info = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DestinationError(f"{what}: cannot lock {path} ({e.strerror})") from None
            raise DestinationError(
                f"{what} is being written by {holder_text(info)}; one writer at a time: wait "
                f"for it to finish or stop it, or choose another path (lock file {path})"
            ) from None
        if _same_file(path, fd):
            break
        os.close(fd)  # its holder released it and removed the file in between: take a new one
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time(), 3),
            "command": command}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    lock = WriterLock(path, fd, created)
    _HELD[str(path)] = lock
    return lock
