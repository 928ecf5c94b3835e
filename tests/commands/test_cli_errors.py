"""Every command: bad input is a `UserError` (one line on stderr, exit 2); an internal bug (a
`TypeError` deep inside) is not swallowed but propagates with its traceback."""

from __future__ import annotations

import pytest
from helpers import REPO, TRAIN_SMALL, tiny_model_dir

from sorted_jax import convert, evaluate, generate, ict, sweep, train
from sorted_jax.core import errors
from sorted_jax.data.tokenizers import ByteTokenizer
from sorted_jax.evaluation.sweep import Runner
from sorted_jax.io import safetensors_shards
from sorted_jax.model.config import ConfigError
from sorted_jax.objective.soft import ExitError
from sorted_jax.parallel.sharding import MeshError


def _one_error_line(err: str, prog: str) -> None:
    assert err.startswith(f"{prog}: error: "), err
    assert err.count("\n") == 1, err  # one line, no traceback


def test_every_user_error_is_one_base():
    for cls in (ConfigError, ExitError, MeshError, errors.DataError, errors.SourceError,
                errors.ModelIOError, errors.ConversionError, errors.MappingError,
                errors.CheckpointError, errors.IctError, errors.EvalError,
                errors.TriviaQAError, errors.DecodeError, errors.TrainConfigError,
                errors.UsageError, errors.MissingFileError, errors.SweepError,
                errors.DestinationError):
        assert issubclass(cls, errors.UserError), cls
    assert issubclass(errors.MissingFileError, FileNotFoundError)
    assert not issubclass(errors.NonFiniteLossError, errors.UserError)
    e = errors.SourceError("'x': not found").prefixed("data.train=")
    assert type(e) is errors.SourceError and str(e) == "data.train='x': not found"


def test_run_cli_reports_user_errors_only(capsys):
    def bad():
        raise errors.DataError("line one\nline two")

    assert errors.run_cli("prog", bad) == 2
    _one_error_line(capsys.readouterr().err, "prog")
    with pytest.raises(TypeError):
        errors.run_cli("prog", lambda: None + 1)
    with pytest.raises(KeyError):  # not a UserError: not caught
        errors.run_cli("prog", lambda: {}["x"])
    assert errors.run_cli("prog", lambda: 0) == 0


@pytest.fixture
def broken_tokenizer(monkeypatch):
    """A bug deep inside every command that tokenizes: ByteTokenizer.encode raises TypeError."""
    def encode(self, text):
        raise TypeError("a bug deep inside")

    monkeypatch.setattr(ByteTokenizer, "encode", encode)


def _train_argv(workdir, *extra):
    return ["train", f"--config={REPO / 'configs' / 'tiny.py'}", f"--workdir={workdir}",
            *TRAIN_SMALL, "--config.num_steps=1", *extra]


def test_train_errors(tmp_path, capsys, broken_tokenizer):
    assert train.main(_train_argv(tmp_path / "a", "--config.exits=0")) == 2
    _one_error_line(capsys.readouterr().err, "sorted_jax.train")
    with pytest.raises(TypeError, match="a bug deep inside"):
        train.main(_train_argv(tmp_path / "b"))


def test_evaluate_errors(tmp_path, capsys, broken_tokenizer):
    common = ["--data", "builtin", "--limit", "4", "--mesh", "1,1,1", "--out",
              str(tmp_path / "out")]
    assert evaluate.main(["--ckpt", str(tmp_path / "nope"), *common]) == 2
    _one_error_line(capsys.readouterr().err, "sorted_jax.evaluate")
    model = tiny_model_dir(tmp_path / "model")
    with pytest.raises(TypeError, match="a bug deep inside"):
        evaluate.main(["--ckpt", str(model), *common])


def test_evaluate_pair_errors(tmp_path, capsys, monkeypatch):
    args = ["pair", "--gens", str(tmp_path / "none.jsonl"), "--a", "x:1", "--b", "y:2",
            "--out", str(tmp_path / "p.jsonl")]
    assert evaluate.main(args) == 2
    _one_error_line(capsys.readouterr().err, "sorted_jax.evaluate pair")
    (tmp_path / "none.jsonl").write_text(
        '{"id": 0, "label": "x", "exit": 1, "instruction": "i", "response": "r"}\n')
    from sorted_jax.evaluation import pairs

    def make_pairs(*a, **k):
        raise TypeError("a bug deep inside")

    monkeypatch.setattr(pairs, "make_pairs", make_pairs)
    with pytest.raises(TypeError, match="a bug deep inside"):
        evaluate.main(args)


def test_ict_errors(tmp_path, capsys, broken_tokenizer):
    common = ["--data", "builtin", "--out", str(tmp_path / "out"), "--num-steps", "1",
              "--mesh", "1,1,1", "--batch-size", "2", "--max-len", "32"]
    assert ict.main(["--ckpt", str(tmp_path / "nope"), *common]) == 2
    _one_error_line(capsys.readouterr().err, "sorted_jax.ict")
    model = tiny_model_dir(tmp_path / "model")
    with pytest.raises(TypeError, match="a bug deep inside"):
        ict.main(["--ckpt", str(model), *common])


def test_generate_errors(tmp_path, capsys, broken_tokenizer):
    assert generate.main(["--ckpt", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    _one_error_line(capsys.readouterr().err, "sorted_jax.generate")
    model = tiny_model_dir(tmp_path / "model")
    with pytest.raises(TypeError, match="a bug deep inside"):
        generate.main(["--ckpt", str(model), "--prompt", "x", "--max-new-tokens", "1"])


def test_convert_errors(tmp_path, capsys, monkeypatch):
    """convert exits 2 like every other command (it used to exit 1)."""
    rc = convert.main(["hf-to-orbax", "--hf", str(tmp_path / "nope"), "--out",
                       str(tmp_path / "o")])
    assert rc == 2
    _one_error_line(capsys.readouterr().err, "sorted_jax.convert hf-to-orbax")
    model = tiny_model_dir(tmp_path / "model")

    def write_shard(*a, **k):
        raise TypeError("a bug deep inside")

    monkeypatch.setattr(safetensors_shards, "write_shard", write_shard)
    with pytest.raises(TypeError, match="a bug deep inside"):
        convert.main(["orbax-to-hf", "--ckpt", str(model), "--out", str(tmp_path / "hf"),
                      "--no-progress"])
    assert not (tmp_path / "hf").exists()


def test_sweep(tmp_path, capsys, monkeypatch):
    cfg = str(REPO / "configs" / "tiny_finetune.py")
    assert sweep.main(["--config", cfg, "--out", str(tmp_path / "s"), "--recipe", "nope"]) == 2
    _one_error_line(capsys.readouterr().err, "sorted_jax.sweep")

    def run(self, name, argv):
        raise TypeError("a bug deep inside")

    monkeypatch.setattr(Runner, "__call__", run)
    with pytest.raises(TypeError, match="a bug deep inside"):
        sweep.main(["--config", cfg, "--out", str(tmp_path / "s2"), "--recipe", "uniform"])
