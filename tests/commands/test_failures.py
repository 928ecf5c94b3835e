"""What happens when things go wrong (issue 17), one test per defect, through the real commands
and real Orbax checkpoints: destinations that are checked before any work and never lose a
user's files, checkpoints that are validated before a resume, loud failures with one line.

The non-finite stop (a checkpoint is good only if the loss and gradient norm at its weights were
finite) is `test_train.py::test_non_finite_stop_names_the_quantity_and_a_healthy_checkpoint`;
the SIGTERM marker (`run_status.json` "preempted") is checked in `test_train_resume.py`.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from helpers import REPO, TINY_CONFIG_FILE, TRAIN_SMALL, tiny_model_dir

from sorted_jax import convert, evaluate, generate, ict, train
from sorted_jax.io import model_io
from sorted_jax.training import checkpoint_integrity, metrics_log, run_status


def train_argv(workdir, *extra):
    return ["train", f"--config={TINY_CONFIG_FILE}", f"--workdir={workdir}", *TRAIN_SMALL,
            "--config.data.eval=none", *extra]


def one_error(capsys, prog: str) -> str:
    """The command's stderr: exactly one `PROG: error: ...` line, no traceback."""
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("train:")]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def snapshot(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


# -- 1. training into a dir it did not write -------------------------------------------------


def test_train_refuses_a_dir_it_did_not_write(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "model")  # an Orbax model dir
    hf = tmp_path / "hf"  # an HF-style dir
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    (hf / "model.safetensors").write_bytes(b"weights")
    before = {p: snapshot(p) for p in (model, hf)}
    for wd in (model, hf):
        assert train.main(train_argv(wd, "--config.num_steps=1")) == 2
        assert "is not an output of sorted_jax.train" in one_error(capsys, "sorted_jax.train")
    # a new workdir inside its own init_from would write into the model dir
    assert train.main(train_argv(model / "run", f"--config.init_from={model}",
                                 "--config.model.preset=", "--config.num_steps=1")) == 2
    assert "is (inside) the input" in one_error(capsys, "sorted_jax.train")
    assert {p: snapshot(p) for p in (model, hf)} == before


# -- 2. conversion in place ------------------------------------------------------------------


def test_convert_never_writes_into_or_over_its_input(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "model")
    hf = tmp_path / "hf"
    assert convert.main(["orbax-to-hf", "--ckpt", str(model), "--out", str(hf),
                         "--no-progress"]) == 0
    capsys.readouterr()
    link = tmp_path / "link"
    link.symlink_to(hf)
    before = {p: snapshot(p) for p in (model, hf)}
    for out in (hf, hf / "sub", link):
        rc = convert.main(["hf-to-orbax", "--hf", str(hf), "--out", str(out), "--overwrite",
                           "--no-progress"])
        assert rc == 2
        assert "input" in one_error(capsys, "sorted_jax.convert hf-to-orbax")
    for out in (model, model / "hf", tmp_path):  # its checkpoint, inside it, above it
        rc = convert.main(["orbax-to-hf", "--ckpt", str(model), "--out", str(out),
                           "--overwrite", "--no-progress"])
        assert rc == 2
        assert "input" in one_error(capsys, "sorted_jax.convert orbax-to-hf")
    assert {p: snapshot(p) for p in (model, hf)} == before


# -- 3. a damaged latest checkpoint; resume_step ---------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, and a train log row per step."""
    wd = tmp_path_factory.mktemp("trained") / "run"
    assert train.main(train_argv(wd, "--config.num_steps=4", "--config.checkpoint_every=2",
                                 "--config.log_every=1")) == 0
    return wd


def test_damaged_latest_checkpoint_resumes_from_the_previous_intact_one(trained, capsys):
    wd = trained
    capsys.readouterr()
    assert model_io.workdir_steps(wd) == [2, 4]
    assert checkpoint_integrity.health(wd, 2) == checkpoint_integrity.GOOD
    assert checkpoint_integrity.health(wd, 4) == checkpoint_integrity.UNCHECKED
    assert run_status.read(wd)["status"] == run_status.FINISHED
    # truncate the biggest tensor file of step 4: Orbax still lists the step
    files = sorted((p for p in (wd / "checkpoints" / "4" / "state").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    with open(files[-1], "r+b") as f:
        f.truncate(files[-1].stat().st_size // 2)
    assert "changed size" in checkpoint_integrity.problem(wd, 4)

    assert train.main(train_argv(wd, "--config.num_steps=4", "--config.checkpoint_every=2",
                                 "--config.log_every=1")) == 0
    out = capsys.readouterr().out
    assert "step 4 in" in out and "is damaged" in out and "resuming from step 2" in out, out
    assert model_io.workdir_steps(wd) == [2, 4]  # step 4 written afresh
    assert checkpoint_integrity.problem(wd, 4) is None
    aside = list((wd / checkpoint_integrity.SET_ASIDE_DIR).glob("*/4"))
    assert len(aside) == 1  # the damaged one is kept, out of the way
    params, _, step = model_io.load_workdir_params(wd)
    assert step == 4 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))

    # 9: steps 3 and 4 were trained twice; the superseded rows are dropped when read
    raw = [json.loads(x) for x in (wd / metrics_log.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in raw if r["split"] == "train"] == [1, 2, 3, 4, 3, 4]
    assert [r["step"] for r in metrics_log.read_metrics(wd, "train")] == [1, 2, 3, 4]

    # resume_step: an absent step, a damaged one, a bad value: one line each, before any work
    assert train.main(train_argv(wd, "--config.num_steps=4", "--config.resume_step=3")) == 2
    assert "resume_step=3 is not a checkpoint" in one_error(capsys, "sorted_jax.train")
    (wd / "checkpoints" / "2" / "state" / "_METADATA").unlink()
    assert train.main(train_argv(wd, "--config.num_steps=4", "--config.resume_step=2")) == 2
    assert "damaged: state/_METADATA missing" in one_error(capsys, "sorted_jax.train")
    assert train.main(train_argv(wd, "--config.num_steps=4", "--config.resume_step=-2")) == 2
    assert "resume_step must be" in one_error(capsys, "sorted_jax.train")


# -- 4. a failed asynchronous save -------------------------------------------------------------


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    from sorted_jax import train
    from sorted_jax.training import checkpoint

    save = checkpoint.Checkpointer.save
    calls = []

    def save_then_fill_the_disk(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 2:  # the first save is on disk; every later file write > 8 KB fails
            self.wait()
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
        return save(self, step, *args, **kwargs)

    checkpoint.Checkpointer.save = save_then_fill_the_disk
    sys.exit(train.main(sys.argv))
""")


def test_failed_async_save_stops_the_run_with_one_message(tmp_path):
    wd = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, *train_argv(wd, "--config.num_steps=12",
                                                      "--config.checkpoint_every=2",
                                                      "--config.log_every=4")[1:]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    err = "\n".join(x for x in proc.stderr.replace("\r", "\n").splitlines()
                    if x.strip() and not x.startswith("train:"))
    assert proc.returncode == 2, proc.stdout[-2000:] + err[-3000:]
    assert err.count("\n") == 0 and "Traceback" not in err, err  # one line
    assert err.startswith("sorted_jax.train: error: could not save step 4"), err
    assert "The last good checkpoint is step 2" in err, err
    assert model_io.workdir_steps(wd) == [2]
    # "checkpoint: step N" once N is on disk, never for the save that failed
    assert "checkpoint: step 2" in proc.stdout and "checkpoint: step 4" not in proc.stdout
    status = run_status.read(wd)
    assert status["status"] == run_status.FAILED and status["step"] < 12


# -- 6. dropped and truncated records ----------------------------------------------------------


def test_dropped_and_truncated_records_are_reported(tmp_path, capsys):
    rows = [{"instruction": f"add {i} and 1", "output": f"{i + 1}"} for i in range(12)]
    rows[3] = {"instruction": "x" * 300, "output": "dropped: the prompt alone is too long"}
    rows[7] = {"instruction": "y" * 300, "output": "dropped too"}
    rows[9] = {"instruction": "short", "output": "z" * 300}  # truncated
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    wd = tmp_path / "run"
    assert train.main(train_argv(wd, f"--config.data.train={data}", "--config.max_len=256",
                                 "--config.data.buckets=256", "--config.data.max_records=0",
                                 "--config.num_steps=1")) == 0
    out = capsys.readouterr().out
    assert f"12 records, 2 dropped (prompt longer than max_len=256), 1 truncated; first " \
           f"dropped: {data}:4: record 3" in out, out
    stats = json.loads((wd / "data_stats.json").read_text())["train"]
    assert stats == {"records": 12, "examples": 10, "dropped": 2, "truncated": 1,
                     "first_dropped": f"{data}:4: record 3"}

    assert evaluate.main(["--ckpt", str(wd), "--data", str(data), "--mesh", "1,1,1",
                          "--max-len", "256", "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "12 records, 2 dropped (prompt longer than --max-len 256), 1 truncated; first " \
           f"dropped: {data}:4: record 3" in out, out
    row = json.loads((tmp_path / "ev" / "exit_metrics.json").read_text())["checkpoints"][0]
    assert (row["dropped"], row["truncated"]) == (2, 1)

    assert ict.main(["--ckpt", str(wd), "--data", str(data), "--mesh", "1,1,1", "--max-len",
                     "256", "--num-steps", "1", "--out", str(tmp_path / "ict")]) == 0
    out = capsys.readouterr().out
    assert "ICT data: 12 records, 2 dropped (prompt longer than max_len=256), 1 truncated; " \
           f"first dropped: {data}:4: record 3" in out, out
    meta = json.loads((tmp_path / "ict" / "ict.json").read_text())
    assert meta["data_stats"] == stats


# -- 7. destinations checked before the work ---------------------------------------------------


def test_destinations_are_checked_before_anything_is_loaded(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "model")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    rc = ict.main(["--ckpt", str(model), "--data", "builtin", "--out", str(mine), "--overwrite",
                   "--num-steps", "1", "--mesh", "1,1,1", "--batch-size", "2",
                   "--max-len", "32"])
    assert rc == 2
    assert "--out" in one_error(capsys, "sorted_jax.ict")
    # a missing checkpoint is not even looked at: --out is refused first
    missing = str(tmp_path / "missing")
    assert ict.main(["--ckpt", missing, "--data", "builtin", "--out", str(mine)]) == 2
    assert "--out" in one_error(capsys, "sorted_jax.ict")
    assert evaluate.main(["--ckpt", missing, "--data", "builtin", "--out", str(mine)]) == 2
    assert "--out" in one_error(capsys, "sorted_jax.evaluate")
    notes = mine / "notes.txt"
    assert generate.main(["--ckpt", missing, "--prompt", "hi", "--out", str(notes)]) == 2
    assert "--out" in one_error(capsys, "sorted_jax.generate")
    assert notes.read_text() == "keep me"


# -- 8. tracebacks where a message belongs -----------------------------------------------------


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "model")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a dir")
    cases = {  # what the user did -> (command, argv, words of the message)
        "workdir is a file": (train, train_argv(a_file, "--config.num_steps=1"), "is a file"),
        "tokenizer is a JSON file": (train, train_argv(
            tmp_path / "w1", "--config.num_steps=1",
            f"--config.data.tokenizer={tmp_path / 'tokenizer.json'}"), "not a SentencePiece"),
        "data is one JSON object": (train, train_argv(
            tmp_path / "w2", "--config.num_steps=1",
            f"--config.data.train={tmp_path / 'obj.json'}"), "give a JSON list"),
        "generate --out is a dir": (generate, ["--ckpt", str(model), "--prompt", "x", "--out",
                                               str(tmp_path)], "is a directory"),
        "generate --out is its input": (generate, [
            "--ckpt", str(model), "--prompts", str(tmp_path / "p.jsonl"), "--out",
            str(tmp_path / "p.jsonl")], "input"),
        "evaluate --out is a file": (evaluate, ["--ckpt", str(model), "--data", "builtin",
                                                "--out", str(a_file)], "is a file"),
        "convert --out under a file": (convert, [
            "orbax-to-hf", "--ckpt", str(model), "--out", str(a_file / "hf")], "is a file"),
        "ict --lr -1": (ict, ["--ckpt", str(model), "--data", "builtin", "--out",
                              str(tmp_path / "ict"), "--lr", "-1"], "--lr must be > 0"),
        "a prompt field is a number": (generate, [
            "--ckpt", str(model), "--prompts", str(tmp_path / "num.jsonl"),
            "--max-new-tokens", "1"], "field 'instruction' is a int, expected a string"),
    }
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {}}')
    (tmp_path / "obj.json").write_text(json.dumps(
        {"instruction": "a", "output": "b"}, indent=2))
    (tmp_path / "p.jsonl").write_text('{"instruction": "hi"}\n')
    (tmp_path / "num.jsonl").write_text('{"instruction": 5}\n')
    for what, (module, argv, words) in cases.items():
        prog = "sorted_jax." + module.__name__.rsplit(".", 1)[1]
        if module is convert:
            prog += f" {argv[0]}"
        assert module.main(argv) == 2, what
        assert words in one_error(capsys, prog), what
    assert (tmp_path / "p.jsonl").read_text() == '{"instruction": "hi"}\n'


# -- 9. stale temp dirs of a killed conversion, modes, --overwrite of its own output -----------


def test_convert_cleans_stale_temp_dirs_and_keeps_the_umask(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "model")
    # a pid above any pid_max: that process is not running
    dead = tmp_path / f".hf.tmp-{2 ** 22 + 7}@{socket.gethostname()}-deadbeef"
    other_host = tmp_path / f".hf.tmp-{os.getpid()}@another-host-0123abcd"  # may be running
    legacy = tmp_path / ".hf.tmp-ab12cd34"  # tempfile.mkdtemp's names, before this fix
    for d in (dead, legacy, other_host):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half written")
    old = os.umask(0o022)
    try:
        argv = ["orbax-to-hf", "--ckpt", str(model), "--out", str(tmp_path / "hf"),
                "--no-progress"]
        assert convert.main(argv) == 0
        capsys.readouterr()
        assert not dead.exists() and not legacy.exists() and other_host.exists()
        assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o755
        assert convert.main(argv) == 2  # its own output: replaced only when asked
        assert "pass --overwrite" in one_error(capsys, "sorted_jax.convert orbax-to-hf")
        assert convert.main([*argv, "--overwrite"]) == 0
    finally:
        os.umask(old)
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == [
        other_host]
