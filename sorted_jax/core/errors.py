"""Errors the user must fix, in one place, and how every command reports them.

`UserError` means "the input is wrong: a config value, a flag, a path, a data file, a
checkpoint that does not fit". Every command (`train`, `evaluate`, `ict`, `generate`,
`convert`) runs through `run_cli`, which catches `UserError` and nothing wider, prints
`PROG: error: MESSAGE` on one line and exits 2. Anything else is a bug and keeps its
traceback. Subclasses exist where a caller needs to tell errors apart; the three that live
beside the code they guard (`config.ConfigError`, `soft.ExitError`, `sharding.MeshError`)
derive from `UserError` too.

`UserError` is a `ValueError` (and `MissingFileError` a `FileNotFoundError`) so that library
callers that caught those before still do.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

USER_ERROR_EXIT = 2


class UserError(ValueError):
    """Something the user must fix; the message says what (one line, no traceback)."""

    def prefixed(self, prefix: str) -> UserError:
        """The same kind of error with `prefix` in front of its message (a flag name, a
        config key), so a caller adds context without re-typing the error."""
        err = type(self)(f"{prefix}{self}")
        err.__cause__ = self.__cause__
        return err


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class UsageError(UserError):
    """Command-line arguments that do not fit together (e.g. a flag of another mode)."""


class TrainConfigError(UserError):
    """A training config that cannot run; raised before anything is compiled. `fields`: the
    config fields it is about, so the command can say where their values came from."""

    def __init__(self, message: str = "", *, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.fields = tuple(fields)


class DataError(UserError):
    """A malformed record, data file or tokenizer; the message says where."""


class SourceError(UserError):
    """A data source that cannot be opened at all: a missing file, a bad split, an unprepared
    TFDS dataset. The message starts with the spec, so a CLI can prefix its flag name."""


class ModelIOError(UserError):
    """A model dir / workdir that cannot be read or written; the message says what to fix."""


class DestinationError(ModelIOError):
    """An output path that would overwrite or delete something the command does not own
    (`sorted_jax.io.destinations`)."""


class ConversionError(ModelIOError):
    """An input that cannot be converted; the message names the file/tensor and the fix."""


class MappingError(UserError):
    """An HF state dict whose names or shapes do not fit the config."""


class CheckpointError(UserError):
    """A training checkpoint that cannot be written or does not fit the current run."""


class IctError(UserError):
    """ICT heads that cannot be read, or do not fit the model / the requested exits."""


class EvalError(UserError):
    """Arguments, checkpoints or data that cannot be evaluated; the message says why."""


class TriviaQAError(UserError):
    """A TriviaQA file that is not in the official format; the message says where."""


class SweepError(UserError):
    """A recipe sweep that cannot run as asked (bad recipe, a failed child command)."""


class DecodeError(UserError):
    """Decoding options or prompts that the model cannot run (a layer out of range, a prompt
    longer than the context, ...)."""


class ServeError(UserError):
    """A request the server refuses; `status` is its HTTP code (400 unless a subclass says)."""

    status = 400


class QueueFullError(ServeError):
    """Too many requests waiting: the client should retry later."""

    status = 429


class RequestTimeoutError(ServeError):
    """A request that did not finish within the server's per-request timeout."""

    status = 504


class ShuttingDownError(ServeError):
    """The server is stopping and takes no new work."""

    status = 503


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the bad state was not saved.

    Not a `UserError`: the inputs were valid, the run diverged. `train` exits 1 with it.
    """


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split("\n"))


def run_cli(prog: str, fn: Callable[..., Any], *args: Any) -> int:
    """`fn(*args)`; a `UserError` becomes `PROG: error: MESSAGE` on stderr and exit status 2.

    Returns `fn`'s int result (0 when it returns anything else). Other exceptions propagate.
    """
    try:
        out = fn(*args)
    except UserError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    return out if isinstance(out, int) and not isinstance(out, bool) else 0
