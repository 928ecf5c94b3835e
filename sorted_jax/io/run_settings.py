"""What a finished run recorded beside its weights, read back by one reader for both kinds of
run: a training workdir's `train_config.json` (the full config of its latest launch) and an
SFT+ICT dir's `ict.json`. A field is None when the run did not record it.

    settings = read_run_settings(path, ict_dir.read_meta(path))
    settings.max_len, settings.template, settings.buckets   # defaults for evaluate and ict
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sorted_jax.core.errors import ModelIOError

TRAIN_CONFIG_FILE = "train_config.json"  # the full training config of a workdir's latest launch


def _int_list(value: Any) -> list[int] | None:
    """[128, 256] from "128,256" or a list; None for "" / None / anything unreadable."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, list | tuple):
        return [int(x) for x in value]
    try:
        return [int(x) for x in str(value).replace(" ", "").split(",") if x]
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a training (or SFT+ICT) run recorded; None = not recorded."""

    data: str | None = None  # the training data spec
    template: str | None = None
    max_len: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    dtype: str | None = None  # compute dtype
    eval_holdout: int = 0  # records of a JSON file held out as the eval set
    data_seed: int = 0
    buckets: list[int] | None = None
    train_exits: str | None = None  # the exit-set spec trained (SoFT / SFT runs)
    eval_exits: str | None = None
    tokenizer: str | None = None  # the tokenizer spec the run was given

    @classmethod
    def from_train_config(cls, c: Mapping[str, Any]) -> RunSettings:
        """From a `train_config.json` dict (a config's `to_json_best_effort`)."""
        data = c.get("data", {})
        optim = c.get("optim", {})
        return cls(
            data=data.get("train"), template=data.get("template"), max_len=c.get("max_len"),
            batch_size=c.get("batch_size"), lr=optim.get("lr"), dtype=c.get("dtype"),
            eval_holdout=int(data.get("eval_holdout", 0) or 0),
            data_seed=int(data.get("seed", 0) or 0), buckets=_int_list(data.get("buckets")),
            train_exits=c.get("exits"), eval_exits=c.get("eval_exits"),
            tokenizer=data.get("tokenizer"))

    @classmethod
    def from_ict_meta(cls, m: Mapping[str, Any]) -> RunSettings:
        """From an SFT+ICT dir's `ict.json` (its heads' exits are `ict_dir.head_exits`)."""
        return cls(
            data=m.get("data"), template=m.get("template"), max_len=m.get("max_len"),
            batch_size=m.get("batch_size"), lr=m.get("lr"), dtype=m.get("dtype"),
            eval_holdout=int(m.get("holdout", 0) or 0), data_seed=int(m.get("data_seed", 0) or 0),
            buckets=_int_list(m.get("buckets")))


def read_run_settings(path: str | Path, ict_meta: Mapping[str, Any] | None = None
                      ) -> RunSettings:
    """The settings recorded in `path`: its `ict.json` (`ict_meta`, already read) when it is an
    SFT+ICT dir, else its `train_config.json`; empty settings when it has neither (a converted
    model dir). A `train_config.json` that cannot be read is refused (`ModelIOError`): silently
    using the defaults instead would evaluate with another template, length and exits."""
    if ict_meta:
        return RunSettings.from_ict_meta(ict_meta)
    f = Path(path) / TRAIN_CONFIG_FILE
    if not f.is_file():
        return RunSettings()
    fix = ("it records how the run was trained (template, max_len, exits): restore it (re-run "
           "`train` on the workdir rewrites it), or move it away to use the defaults")
    try:
        c = json.loads(f.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelIOError(f"{f} cannot be read ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(c, Mapping) or not all(
            isinstance(c.get(k, {}), Mapping) for k in ("data", "optim")):
        raise ModelIOError(f"{f} is not a training config (a JSON object with 'data' and "
                           f"'optim' groups); {fix}")
    return RunSettings.from_train_config(c)
