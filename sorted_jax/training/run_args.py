"""The training command line: `--config=FILE --workdir=DIR [--config.key=value ...]` parsed into
a config, with one-line errors for what a user gets wrong before anything runs, and where a
value came from for an error about it.

    config, workdir = parse_args(sys.argv)        # TrainConfigError: one line saying what to fix
    raise with_origins(err, sys.argv)             # "... (model.vocab_size is set in the config
                                                  #  file configs/tiny.py)"

A config file that is missing, a directory, or fails to load (a syntax error, an exception in
`get_config`) is one line naming the file (and the line); an unknown `--config.` key names the
close match and the group's fields. `usage()` is what `--help` prints.
"""

from __future__ import annotations

import difflib
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from sorted_jax.core.errors import TrainConfigError
from sorted_jax.training.train_config import default_config

__all__ = ["parse_args", "usage", "wants_help", "with_origins"]

SCHEMA = "sorted_jax/training/train_config.py"


def usage(prog: str = "python -m sorted_jax.train") -> str:
    return (
        f"usage: {prog} --config=FILE --workdir=DIR [--config.KEY=VALUE ...]\n"
        f"       {prog} --config=FILE --workdir=DIR --plan [--plan_devices=N] "
        "[--plan_device_memory=h100|GIB]\n\n"
        "SoFT / SFT training. Re-running the same command on a workdir resumes it.\n\n"
        "  --config=FILE       a config file, e.g. configs/tiny.py (CPU), configs/soft_7b.py\n"
        "  --workdir=DIR       where checkpoints, logs and reports go (new, empty or a\n"
        "                      training workdir, which resumes)\n"
        "  --config.KEY=VALUE  override any field, e.g. --config.optim.lr=1e-5 "
        "--config.exits=12,20,32\n"
        "  --plan              print the per-device memory of the train step; train nothing\n\n"
        f"Every field, with its default and meaning: {SCHEMA}; the guide: docs/training.md.\n")


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:])


def _flag_values(argv: Sequence[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    # sys_argv: config_flags defines one flag per override it finds in these args.
    config_flags.DEFINE_config_file(
        "config", None, "training config file, e.g. configs/tiny.py", flag_values=fv,
        lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs); re-run to resume",
                        flag_values=fv)
    return fv


def _override_keys(argv: Sequence[str]) -> list[str]:
    return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def _config_arg(argv: Sequence[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _check_config_file(text: str) -> None:
    """A missing or directory config file, said plainly (ml_collections would chain two
    tracebacks). `FILE:ARG` (an argument for get_config) names FILE."""
    path = Path(text)
    if not path.exists() and ":" in text and Path(text.rsplit(":", 1)[0]).exists():
        path = Path(text.rsplit(":", 1)[0])
    if not path.exists():
        raise TrainConfigError(f"--config={text}: no such file; give a config file such as "
                               "configs/tiny.py (the files in configs/ start from the fields "
                               f"of {SCHEMA})")
    if path.is_dir():
        raise TrainConfigError(f"--config={text} is a directory; give a config file such as "
                               f"{path / 'tiny.py'}")


def _load_failure(text: str, e: BaseException) -> TrainConfigError:
    """A config file that raised while loading: its exception, at the file's line."""
    where = ""
    if isinstance(e, SyntaxError) and e.lineno:
        where = f" (line {e.lineno})"
    else:
        name = Path(text.split(":", 1)[0]).name
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
                 if Path(f.filename).name == name]
        if lines:
            where = f" (line {lines[-1]})"
    cause = e.__cause__ if isinstance(e, OSError) and e.__cause__ is not None else e
    detail = " ".join(str(cause).split())[:300]
    return TrainConfigError(f"--config={text} could not be loaded{where}: "
                            f"{type(cause).__name__}: {detail}")


def _unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str | None:
    """A clear message if `key` ("config.optim.lrr") is not a field of `config`, else None."""
    node: Any = config
    parts = key.split(".")[1:]
    for i, part in enumerate(parts):
        if isinstance(node, ml_collections.ConfigDict) and part in node:
            node = node[part]
            continue
        where = ".".join(["config", *parts[:i]])
        if not isinstance(node, ml_collections.ConfigDict):
            return f"unknown config key '{key}': '{where}' is a value, not a group"
        known = sorted(node.keys())
        close = difflib.get_close_matches(part, known, n=1)
        hint = f" Did you mean '{where}.{close[0]}'?" if close else ""
        return f"unknown config key '{key}'.{hint} Fields of '{where}': {', '.join(known)} " \
               f"(see {SCHEMA})"
    return None


def _file_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """The config file's config, without the command line's overrides."""
    plain = [a for a in argv if not a.startswith("--config.")]
    fv = _flag_values(plain)
    fv(plain)
    return fv.config


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
    """(config with overrides applied, workdir) from `argv` (argv[0] is the program name)."""
    argv = list(argv)
    text = _config_arg(argv)
    if text is None:
        raise TrainConfigError("--config is required, e.g. --config=configs/tiny.py (see "
                               "--help)")
    _check_config_file(text)
    fv = _flag_values(argv)
    try:
        rest = fv(argv)
        config = fv.config
    except Exception as e:  # noqa: BLE001 - a user's config file may raise anything
        try:
            base = _file_config(argv)
        except Exception as load_error:  # noqa: BLE001 - the file itself is broken
            raise _load_failure(text, load_error) from None
        for key in _override_keys(argv):
            msg = _unknown_key_message(base, key)
            if msg:
                raise TrainConfigError(msg) from None
        raise TrainConfigError(f"bad command line: {' '.join(str(e).split())}") from None
    if len(rest) > 1:
        raise TrainConfigError(f"unexpected arguments {rest[1:]}; use --config=... "
                               "--workdir=... [--config.key=value ...] (see --help)")
    if not fv.workdir:
        raise TrainConfigError("--workdir is required: where checkpoints and logs go")
    return config, fv.workdir


# ---------------------------------------------------------------------------------------------
# where a value came from


def _get(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def origin(argv: Sequence[str], key: str) -> str:
    """Where field `key` ("model.vocab_size") got its value: the command line, the config file,
    or the schema's default."""
    if f"config.{key}" in _override_keys(argv):
        return "on the command line"
    try:
        from_file = _get(_file_config(argv), key)
        default = _get(default_config(), key)
    except Exception:  # noqa: BLE001 - no origin is better than a second error
        return ""
    if from_file != default:
        return f"in the config file {_config_arg(argv)}"
    return f"by default ({SCHEMA})"


def with_origins(err: TrainConfigError, argv: Sequence[str]) -> TrainConfigError:
    """`err` with where each of its fields (`err.fields`) was set, grouped: "(model.vocab_size
    is set in the config file configs/tiny.py; model.hidden_size is set on the command
    line)"."""
    fields = getattr(err, "fields", ())
    if not fields:
        return err
    groups: dict[str, list[str]] = {}
    for key in fields:
        where = origin(argv, key)
        if where:
            groups.setdefault(where, []).append(key)
    if not groups:
        return err
    said = "; ".join(f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} set {where}"
                     for where, keys in groups.items())
    out = TrainConfigError(f"{err} ({said})", fields=fields)
    out.__cause__ = err.__cause__
    return out
