"""An SFT+ICT dir on disk: a model dir (the frozen trunk) + `ict_heads/` + `ict.json`.

The heads themselves (their init, loss and evaluation) are `objective.heads`; this module only
reads and writes them, so the objective never imports the io layer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sorted_jax.core.errors import IctError
from sorted_jax.data import save_tokenizer_files
from sorted_jax.io import destinations, model_io
from sorted_jax.model.config import LlamaConfig
from sorted_jax.objective.heads import IctHeads, check_heads

HEADS_DIR = "ict_heads"
ICT_FILE = "ict.json"


def has_heads(path: str | Path) -> bool:
    return (Path(path) / HEADS_DIR).is_dir()


def read_meta(path: str | Path) -> dict[str, Any]:
    f = Path(path) / ICT_FILE
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise IctError(f"{f}: not valid JSON: {e}") from None


def head_exits(path: str | Path) -> tuple[int, ...] | None:
    """The exits a model dir has ICT heads for (from ict.json), or None when it has none."""
    p = Path(path)
    if not has_heads(p):
        return None
    meta = read_meta(p)
    if "exits" not in meta:
        raise IctError(f"{p / HEADS_DIR} exists but {p / ICT_FILE} with its 'exits' is missing")
    return tuple(int(e) for e in meta["exits"])


def load_heads(path: str | Path, config: LlamaConfig) -> IctHeads | None:
    """The ICT heads stored in a model dir, or None when it has none."""
    p = Path(path)
    exits = head_exits(p)
    if exits is None:
        return None
    tree = model_io.restore_params(p / HEADS_DIR)
    missing = {"norm_scale", "lm_head_kernel"} - set(tree)
    if missing:
        raise IctError(f"{p / HEADS_DIR} lacks {sorted(missing)} (has {sorted(tree)})")
    heads = IctHeads(exits, np.asarray(tree["norm_scale"]),
                     np.asarray(tree["lm_head_kernel"]))
    check_heads(heads, config, where=str(p / HEADS_DIR))
    return heads


def save_ict_dir(out_dir: str | Path | destinations.Destination, params: Mapping[str, Any],
                 config: LlamaConfig, heads: IctHeads, tokenizer_spec: str | None,
                 meta: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Atomically write the trunk as a model dir, plus `ict_heads/` and `ict.json` (`out_dir`
    a path, or a `Destination` the ICT command checked before training)."""
    model_io.check_params(params, config)
    check_heads(heads, config)
    with destinations.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        config.to_json_file(tmp / model_io.CONFIG_FILE)
        if tokenizer_spec:
            save_tokenizer_files(tokenizer_spec, tmp)
        model_io.save_params(tmp / model_io.PARAMS_DIR, params)
        model_io.save_params(tmp / HEADS_DIR, {k: np.asarray(v) for k, v in heads.tree().items()})
        (tmp / ICT_FILE).write_text(json.dumps({**meta, "exits": list(heads.exits)}, indent=2)
                                    + "\n")
    return out_dir.path if isinstance(out_dir, destinations.Destination) else Path(out_dir)
