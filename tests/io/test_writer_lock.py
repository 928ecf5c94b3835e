"""One writer per destination (`io/writer_lock`, taken by every `destinations` claim): another
real process holds the lock, a second writer is refused naming it, a kill -9 leaves nothing
that blocks the next writer. The two-`train` case is tests/commands/test_one_writer.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import REPO, tiny_model_dir

from sorted_jax import convert, generate
from sorted_jax.core.errors import DestinationError
from sorted_jax.io import destinations, writer_lock

# Claims PATH the way a command does, says so, then waits until killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from sorted_jax.io import destinations
    kind, path, command = sys.argv[1:4]
    if kind == "dir":
        dest = destinations.claim_dir(path, flag="--workdir", command=command, resume=True)
    else:
        dest = destinations.claim_file(path, flag="--out", command=command)
    print("holding", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def holder():
    procs = []

    def start(kind: str, path, command: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, kind, str(path), command],
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "holding"
        return proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def one_error(capsys, prog: str) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, holder):
    wd = tmp_path / "run"
    proc = holder("dir", wd, "sorted_jax.train")
    lock = wd / writer_lock.LOCK_FILE
    info = json.loads(lock.read_text())
    assert (info["pid"], info["host"], info["command"]) == (
        proc.pid, socket.gethostname(), "sorted_jax.train")
    assert abs(info["since"] - time.time()) < 300
    with pytest.raises(DestinationError) as e:
        destinations.claim_dir(wd, flag="--workdir", command="sorted_jax.train", resume=True)
    msg = str(e.value)
    assert f"--workdir {wd} is being written by sorted_jax.train (PID {proc.pid} on host " \
           f"{socket.gethostname()}, since " in msg, msg
    # the checks alone (no lock) still pass: the dir itself is fine, only its writer is busy
    destinations.claim_dir(wd, flag="--workdir", command="sorted_jax.train", resume=True,
                           lock=False)


def test_kill_9_leaves_no_lock_behind(tmp_path, holder):
    wd = tmp_path / "run"
    proc = holder("dir", wd, "sorted_jax.train")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (wd / writer_lock.LOCK_FILE).exists()  # the file stays; the kernel dropped the lock
    dest = destinations.claim_dir(wd, flag="--workdir", command="sorted_jax.train", resume=True)
    assert json.loads((wd / writer_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    # this process claiming it again (a command run twice in one interpreter) is one writer
    again = destinations.claim_dir(wd, flag="--workdir", command="sorted_jax.train",
                                   resume=True)
    assert again.lock is dest.lock
    dest.release()
    assert not (wd / writer_lock.LOCK_FILE).exists()
    assert list(wd.iterdir()) == [] or not wd.exists()


def test_a_lock_left_in_an_empty_new_dir_does_not_make_it_foreign(tmp_path):
    """A run that was refused or crashed right after taking the lock leaves at most the lock
    file: the next claim still sees an empty dir, not something else's."""
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / writer_lock.LOCK_FILE).write_text("{}")
    dest = destinations.claim_dir(wd, flag="--workdir", command="sorted_jax.train", resume=True)
    assert not dest.own
    dest.release()


def test_out_of_every_command_is_one_writer(tmp_path, holder, capsys):
    """generate --out and convert --out while another process writes them: one line naming
    the holder, before any model is loaded; the holder's temp work is untouched."""
    model = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "gen.jsonl"
    proc = holder("file", out, "sorted_jax.generate")
    assert generate.main(["--ckpt", str(model), "--prompt", "hi", "--out", str(out)]) == 2
    msg = one_error(capsys, "sorted_jax.generate")
    assert f"--out {out} is being written by sorted_jax.generate (PID {proc.pid}" in msg, msg
    assert (tmp_path / ".gen.jsonl.lock").exists() and not out.exists()

    hf = tmp_path / "hf"
    proc = holder("file", hf, "sorted_jax.convert orbax-to-hf")  # the same lock file
    assert convert.main(["orbax-to-hf", "--ckpt", str(model), "--out", str(hf),
                         "--no-progress"]) == 2
    msg = one_error(capsys, "sorted_jax.convert orbax-to-hf")
    assert f"is being written by sorted_jax.convert orbax-to-hf (PID {proc.pid}" in msg, msg
    proc.kill()
    proc.wait()
    # the holder is gone: the same command now writes, and leaves no lock file behind
    assert convert.main(["orbax-to-hf", "--ckpt", str(model), "--out", str(hf),
                         "--no-progress"]) == 0
    assert (hf / "config.json").is_file() and not (tmp_path / ".hf.lock").exists()
