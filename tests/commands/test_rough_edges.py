"""What a new user hits (issue 25), through the real commands: values out of range named with
where they were set, config files that do not load, `--help`, data that is not UTF-8 or is a
directory, packing with buckets, the trained exits as every decoding default, a corrupt
`train_config.json` or checkpoint manifest, training off the main thread, a busy port.

Two writers on one workdir are tests/commands/test_one_writer.py."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import socket
import threading

import pytest
from helpers import BYTE_4L, TINY_CONFIG_FILE, TRAIN_SMALL, tiny_model_dir

from sorted_jax import evaluate, generate, serve, train
from sorted_jax.io import artifacts, run_settings
from sorted_jax.serving.requests import parse_request
from sorted_jax.training import checkpoint_integrity as integrity


def one_error(capsys, prog: str) -> str:
    """The command's stderr: exactly one `PROG: error: ...` line, no traceback."""
    err = capsys.readouterr().err
    lines = [x for x in err.replace("\r", "\n").splitlines()
             if x.strip() and not x.startswith("train:")]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def train_argv(workdir, *extra, config=TINY_CONFIG_FILE):
    return ["train", f"--config={config}", f"--workdir={workdir}", *extra]


# -- values out of range, and where they were set ---------------------------------------------


def test_ratios_and_counts_out_of_range_name_their_field_and_origin(tmp_path, capsys):
    cases = {  # override -> words of the message
        "optim.warmup_ratio=2": "optim.warmup_ratio must be in [0, 1] (a fraction of the run's "
                                "steps), got 2.0",
        "optim.end_lr_ratio=1.5": "optim.end_lr_ratio must be in [0, 1]",
        "exit_curriculum.ramp=-0.1": "exit_curriculum.ramp must be in [0, 1]",
        "optim.b2=1": "optim.b2 must be in [0, 1)",
        "optim.eps=0": "optim.eps must be > 0",
        "data.eval_holdout=-3": "data.eval_holdout must be >= 0",
        "model.hidden_size=-8": "model.hidden_size must be >= 0",
        "epochs=-1": "epochs must be >= 0",
    }
    for override, words in cases.items():
        key = override.split("=")[0]
        assert train.main(train_argv(tmp_path / "w", *TRAIN_SMALL,
                                     f"--config.{override}")) == 2, override
        msg = one_error(capsys, "sorted_jax.train")
        assert words in msg and msg.endswith(f"({key} is set on the command line)"), msg
    assert not (tmp_path / "w").exists()  # refused before the workdir was touched

    # the same value from a config file: the message says so
    cfg = tmp_path / "my_config.py"
    cfg.write_text("from sorted_jax.training.train_config import default_config\n\n\n"
                   "def get_config():\n    c = default_config()\n"
                   "    c.optim.warmup_ratio = 1.5\n    return c\n")
    assert train.main(train_argv(tmp_path / "w", config=cfg)) == 2
    msg = one_error(capsys, "sorted_jax.train")
    assert msg.endswith(f"(optim.warmup_ratio is set in the config file {cfg})"), msg


def test_model_fields_from_the_config_file_are_named_as_such(tmp_path, capsys):
    """The issue's case: init_from with model.preset= (empty) on configs/tiny.py, whose
    model.vocab_size=264 the user never typed; then eval_exits from the same file."""
    model = tiny_model_dir(tmp_path / "model")  # 4 layers
    assert train.main(train_argv(tmp_path / "w", f"--config.init_from={model}",
                                 "--config.model.preset=")) == 2
    msg = one_error(capsys, "sorted_jax.train")
    assert "model.vocab_size=264 is set" in msg and "--config.model.vocab_size=0" in msg, msg
    assert msg.endswith(f"(model.vocab_size is set in the config file {TINY_CONFIG_FILE})"), msg

    assert train.main(train_argv(tmp_path / "w", f"--config.init_from={model}",
                                 "--config.model.preset=", "--config.model.vocab_size=0",
                                 "--config.exits=2,4")) == 2
    msg = one_error(capsys, "sorted_jax.train")
    assert msg.startswith("sorted_jax.train: error: eval_exits='2,4,6,8': exit layers [6, 8] "
                          "are out of range"), msg
    assert f"init_from={model}" in msg  # the model whose depth it is
    assert msg.endswith(f"(eval_exits is set in the config file {TINY_CONFIG_FILE})"), msg
    assert train.main(train_argv(tmp_path / "w", *TRAIN_SMALL, "--config.exits=1,5")) == 2
    msg = one_error(capsys, "sorted_jax.train")
    assert "exits='1,5': exit layers [5] are out of range" in msg, msg
    assert msg.endswith("(exits is set on the command line)"), msg


def test_config_files_that_do_not_load_and_help(tmp_path, capsys):
    bad_syntax = tmp_path / "syntax.py"
    bad_syntax.write_text("def get_config(:\n    pass\n")
    raises = tmp_path / "raises.py"
    raises.write_text("def get_config():\n    x = 1\n    raise RuntimeError('no such dataset')\n")
    cases = {
        "configs/nonexistent.py": "--config=configs/nonexistent.py: no such file",
        str(tmp_path): "is a directory",
        str(bad_syntax): f"--config={bad_syntax} could not be loaded (line 1): SyntaxError",
        str(raises): f"--config={raises} could not be loaded (line 3): RuntimeError: no such "
                     "dataset",
    }
    for config, words in cases.items():
        assert train.main(train_argv(tmp_path / "w", config=config)) == 2, config
        msg = one_error(capsys, "sorted_jax.train")
        assert words in msg, msg

    assert train.main(["train", "--help"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("usage: python -m sorted_jax.train --config=FILE --workdir=DIR")
    assert "sorted_jax/training/train_config.py" in out.out and "docs/training.md" in out.out
    assert out.err == ""


# -- data that is not UTF-8, or a directory ---------------------------------------------------


@pytest.fixture
def bad_files(tmp_path):
    latin1 = tmp_path / "latin1.jsonl"  # 'café' in Latin-1: byte 0xe9
    latin1.write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    chat = tmp_path / "chat.jsonl"
    chat.write_bytes(('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                      '"content": "d\xe9j\xe0 vu"}]}\n').encode("latin-1"))
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    tq = tmp_path / "triviaqa.json"
    tq.write_bytes(json.dumps({"Data": [{"Question": "Caf\xe9?", "Answer": {
        "Value": "x", "Aliases": ["x"], "NormalizedAliases": ["x"]}}]},
        ensure_ascii=False).encode("latin-1"))
    adir = tmp_path / "a_dir"
    adir.mkdir()
    (adir / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    return latin1, chat, binary, tq, adir


def test_bad_encodings_name_the_file_and_the_byte(tmp_path, capsys, bad_files):
    latin1, chat, binary, tq, _ = bad_files
    model = str(tiny_model_dir(tmp_path / "model"))
    ev = ["--ckpt", model, "--mesh", "1,1,1", "--out", str(tmp_path / "ev")]
    cases = [  # (command, argv, the file)
        (train, train_argv(tmp_path / "w1", *TRAIN_SMALL, f"--config.data.train={latin1}"),
         latin1),
        (train, train_argv(tmp_path / "w2", *TRAIN_SMALL, f"--config.data.eval={latin1}"),
         latin1),
        (train, train_argv(tmp_path / "w3", *TRAIN_SMALL, f"--config.data.train={chat}"), chat),
        (train, train_argv(tmp_path / "w4", *TRAIN_SMALL, f"--config.data.train={binary}"),
         binary),
        (evaluate, [*ev, "--data", str(latin1)], latin1),
        (evaluate, [*ev, "--data", str(chat), "--template", "plain"], chat),
        (evaluate, [*ev, "--data", "builtin", "--limit", "2", "--triviaqa", str(tq)], tq),
        (generate, ["--ckpt", model, "--prompts", str(latin1)], latin1),
    ]
    for module, argv, path in cases:
        prog = "sorted_jax." + module.__name__.rsplit(".", 1)[1]
        assert module.main(argv) == 2, argv
        msg = one_error(capsys, prog)
        data = path.read_bytes()  # its first non-ASCII byte starts no valid UTF-8 sequence
        offset = next(i for i, b in enumerate(data) if b >= 0x80)
        assert f"{path}: not UTF-8 text (byte {offset} is 0x{data[offset]:02x})" in msg, msg
        assert "must be UTF-8" in msg, msg


def test_a_data_path_that_is_a_directory_says_so(tmp_path, capsys, bad_files):
    adir = bad_files[-1]
    model = str(tiny_model_dir(tmp_path / "model"))
    ev = ["--ckpt", model, "--mesh", "1,1,1", "--out", str(tmp_path / "ev")]
    cases = [
        (train, train_argv(tmp_path / "w1", *TRAIN_SMALL, f"--config.data.train={adir}")),
        (train, train_argv(tmp_path / "w2", *TRAIN_SMALL, f"--config.data.eval={adir}")),
        (evaluate, [*ev, "--data", str(adir)]),
        (evaluate, [*ev, "--data", "builtin", "--triviaqa", str(adir)]),
        (generate, ["--ckpt", model, "--prompts", str(adir)]),
    ]
    for module, argv in cases:
        prog = "sorted_jax." + module.__name__.rsplit(".", 1)[1]
        assert module.main(argv) == 2, argv
        msg = one_error(capsys, prog)
        assert "is a directory" in msg and "not found" not in msg, msg


# -- a real run: packing with buckets, warmup, off the main thread; then its checkpoint -------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step SoFT run of a 4-layer model at exits 2,4 (not the default set 1..4), packed,
    with configs/tiny.py's data.buckets='48', a warmup longer than the run, started off the
    main thread (as a notebook or a launcher thread would). Returns (workdir, its output)."""
    root = tmp_path_factory.mktemp("trained")
    wd = root / "run"
    argv = train_argv(wd, *TRAIN_SMALL, "--config.model.num_hidden_layers=4",
                      "--config.exits=2,4", "--config.data.packing=True",
                      "--config.optim.warmup_steps=5", "--config.num_steps=2",
                      "--config.checkpoint_every=1", "--config.data.eval=none")
    out, rc = io.StringIO(), []
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        thread = threading.Thread(target=lambda: rc.append(train.main(argv)))
        thread.start()
        thread.join()
    assert rc == [0], out.getvalue()[-3000:]
    return wd, out.getvalue(), argv


def test_packing_ignores_buckets_with_one_note(trained):
    _, out, _ = trained
    assert out.count("data.buckets='48' is ignored for training") == 1, out


def test_a_warmup_longer_than_the_run_is_said(trained):
    _, out, _ = trained
    assert "warning: the warmup (optim.warmup_steps / warmup_ratio) is longer than the run's 2 " \
           "steps" in out, out


def test_training_off_the_main_thread_warns_that_sigterm_saves_nothing(trained):
    _, out, _ = trained
    assert "warning: not running in the main thread, so SIGTERM and SIGINT cannot be handled" \
           in out, out


def test_decoding_defaults_to_the_trained_exits(trained, capsys):
    """generate used the SoFT default set 1..4 (so --thresholds needed 3 values) where serve
    used the trained 2,4; now every entry point starts from `Artifact.default_exits`."""
    wd, _, _ = trained
    art = artifacts.inspect(wd)
    assert art.default_exits() == (2, 4)
    assert generate.main(["--ckpt", str(wd), "--prompt", "add 1 and 2", "--mode", "early-exit",
                          "--thresholds", "0.5", "--max-new-tokens", "6"]) == 0
    err = capsys.readouterr().err
    hist = re.search(r"exits ((?:\d+:\d+ ?)+)", err)
    assert hist, err
    assert {int(x.split(":")[0]) for x in hist.group(1).split()} == {2, 4}, err
    # serve: early exit and the speculative draft default to the trained exits too
    tok = art.tokenizer()
    for body, want in (({"prompt": "x", "mode": "early-exit"}, ("exits", (2, 4))),
                       ({"prompt": "x", "mode": "speculative"}, ("draft_layer", 2))):
        _, opts, _, _ = parse_request(body, False, tok, art.config, art.default_exits())
        assert getattr(opts, want[0]) == want[1]
    warm = serve._warmup_options("early-exit,speculative", art.config, art.default_exits())
    assert (warm[0].exits, warm[1].draft_layer) == ((2, 4), 2)


def test_a_corrupt_train_config_json_is_refused_not_defaulted(trained, tmp_path, capsys):
    wd = shutil.copytree(trained[0], tmp_path / "run")
    f = wd / run_settings.TRAIN_CONFIG_FILE
    f.write_text(f.read_text()[:200])  # truncated
    assert generate.main(["--ckpt", str(wd), "--prompt", "x", "--max-new-tokens", "1"]) == 2
    msg = one_error(capsys, "sorted_jax.generate")
    assert f"{f} cannot be read (JSONDecodeError" in msg and "restore it" in msg, msg
    f.write_text("[1, 2]")
    assert evaluate.main(["--ckpt", str(wd), "--data", "builtin", "--out",
                          str(tmp_path / "ev")]) == 2
    assert f"{f} is not a training config" in one_error(capsys, "sorted_jax.evaluate")


def test_a_corrupt_manifest_is_unknown_health_and_passed_over(trained, tmp_path, capsys):
    """Step 2 diverged, then its manifest got truncated: read as empty it would be resumable
    again. Its health is unknown: the resume passes over it, saying so."""
    wd = shutil.copytree(trained[0], tmp_path / "run")
    assert integrity.health(wd, 1) == integrity.GOOD
    integrity.record_health(wd, 2, integrity.DIVERGED, "loss=nan at these weights")
    m = integrity.manifest_path(wd, 2)
    m.write_text(m.read_text()[:15])
    assert integrity.health(wd, 2) == integrity.UNKNOWN
    assert "of unknown health" in integrity.problem(wd, 2)
    argv = [a if not a.startswith("--workdir=") else f"--workdir={wd}" for a in trained[2]]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert f"step 2 in {wd / 'checkpoints'} is of unknown health: its manifest" in out, out
    assert "resuming from step 1, the newest intact checkpoint" in out, out
    assert integrity.health(wd, 1) == integrity.GOOD  # step 2 trained again, written afresh
    assert integrity.problem(wd, 2) is None
    # asked for by number, a step of unknown health is taken, with a warning
    m.write_text("{")
    step, note = integrity.choose_resume_step(wd, [1, 2], requested=2)
    assert step == 2 and "of unknown health" in note and "as asked" in note


# -- serve on a busy port ---------------------------------------------------------------------


def test_serve_on_a_busy_port_says_so_before_loading(tmp_path, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    model = tiny_model_dir(tmp_path / "model", BYTE_4L)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert serve.main(["--ckpt", str(model), "--port", str(port)]) == 2
    out = capsys.readouterr()
    lines = [x for x in out.err.splitlines() if x.strip()]
    assert len(lines) == 1, out.err
    assert lines[0].startswith(f"sorted_jax.serve: error: --host 127.0.0.1 --port {port}: "
                               "cannot listen there: the address is in use"), lines[0]
    assert "http://" not in out.err + out.out  # no URL printed for a server that never ran
