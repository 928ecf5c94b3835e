"""The "model dir": how converted, trained and exported weights sit on disk.

A model dir is what `python -m sorted_jax.convert hf-to-orbax` writes, what training reads with
`init_from` and what generation loads:

    MODEL_DIR/config.json        our `LlamaConfig` as an HF config.json (`LlamaConfig.to_json_file`)
    MODEL_DIR/params/            an Orbax PyTree checkpoint of the params tree (numpy leaves,
                                 stacked `layers` axis, the layout of `sorted_jax.model.modeling`)
    MODEL_DIR/tokenizer.model    tokenizer files, when the source had them (tokenizer.model,
    MODEL_DIR/tokenizer.json ...  tokenizer.json, tokenizer_config.json, special_tokens_map.json)

`load_params` also reads a training workdir, so every tool that takes "a checkpoint" takes both:

    WORKDIR/config.json                     the model config (HF style)
    WORKDIR/checkpoints/<step>/state        Orbax pytree {"params", "opt_state", "step"}
    WORKDIR/checkpoints/<step>/{data,meta}  JSON items (data position, run metadata)

Only `params` is read from `state` (an Orbax partial restore: optimizer moments stay on disk).
Writers are atomic: everything goes into a temporary dir beside the target, renamed at the end.

`load_params`, `load_config` and `find_tokenizer_dir` read two more model sources, so that a
model arriving from elsewhere works wherever a model is read (`init_from`, every `--ckpt`),
with nothing written beside it (`model_kind` tells the four apart):

    HF_DIR/config.json + model*.safetensors | pytorch_model*.bin   (`hf_checkpoint`)
    MODEL.gguf                               llama.cpp / Ollama / LM Studio (`gguf_file`)

Their weights stream tensor by tensor into our layout (with shardings: one leaf at a time,
straight into its shards); an HF dir's tokenizer is its own files, a GGUF file carries its
tokenizer inside (`data.tokenizers.load_tokenizer` reads it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from sorted_jax.core.errors import ModelIOError
from sorted_jax.data.tokenizers import save_tokenizer_files
from sorted_jax.io import gguf_file, hf_checkpoint, lora_merge
from sorted_jax.io.destinations import atomic_dir, require_filesystem_path, url_scheme
from sorted_jax.io.param_tree import (
    check_params,
    dtype_name,
    expected_param_shapes,
    flatten,
    resolve_dtype,
    unflatten,
)
from sorted_jax.model import lora
from sorted_jax.model.config import ConfigError, LlamaConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM, DATA_ITEM, META_ITEM = "state", "data", "meta"  # a workdir checkpoint's items
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                   "sorted_jax_tokenizer.json")

PathLike = str | os.PathLike
# What a model path holds (`model_kind`); the names are how messages call them.
MODEL_DIR, WORKDIR, HF_DIR, GGUF_FILE = "model dir", "workdir", "HF dir", "GGUF file"


# ---------------------------------------------------------------------------------------------
# shapes (the tree itself: `param_tree`)


def _unbox(tree: Any) -> Any:
    """Drop Flax `Partitioned` boxes that a checkpoint restored as {'value': array} dicts."""
    if isinstance(tree, Mapping):
        if set(tree) == {"value"} and not isinstance(tree["value"], Mapping):
            return tree["value"]
        if set(tree) == {"value", "names"} and not isinstance(tree["value"], Mapping):
            return tree["value"]
        return {k: _unbox(v) for k, v in tree.items()}
    return tree


# ---------------------------------------------------------------------------------------------
# tokenizer files (atomic directories and URL checks: `destinations`)


def find_tokenizer_files(directory: PathLike | None) -> list[Path]:
    """The tokenizer files in `directory`; a GGUF file is its own tokenizer file."""
    if directory is None:
        return []
    d = Path(directory)
    if gguf_file.is_gguf(d):
        return [d]
    return [d / name for name in TOKENIZER_FILES if (d / name).is_file()]


def find_tokenizer_dir(path: PathLike) -> Path | None:
    """`path` itself or its `tokenizer/` subdir (a training workdir's), whichever holds
    tokenizer files (a GGUF file: itself); None if neither does."""
    for cand in (Path(path), Path(path) / "tokenizer"):
        if find_tokenizer_files(cand):
            return cand
    return None


def copy_tokenizer_files(src: PathLike | Iterable[PathLike] | None, dst: PathLike) -> list[str]:
    """Copy tokenizer files from a dir (the known names) or an explicit list of files; from a
    GGUF file, write the tokenizer it carries as HF tokenizer files."""
    if src is None:
        return []
    if isinstance(src, str | os.PathLike) and gguf_file.is_gguf(src):
        return [f.name for f in save_tokenizer_files(src, dst)]
    if isinstance(src, str | os.PathLike):
        src_path = Path(src)
        if not src_path.is_dir():
            raise ModelIOError(f"tokenizer dir {src_path} does not exist")
        files = find_tokenizer_files(src_path)
    else:
        files = [Path(f) for f in src]
        for f in files:
            if not f.is_file():
                raise ModelIOError(f"tokenizer file {f} does not exist")
    copied = []
    for f in files:
        shutil.copyfile(f, Path(dst) / f.name)
        copied.append(f.name)
    return copied


# ---------------------------------------------------------------------------------------------
# Orbax params


def _no_copy_registry():
    """Orbax's standard type handlers, except numpy arrays are written without a deep copy.

    Orbax deep-copies host arrays before an (async) save by default: a second copy of the
    model. Our saves are synchronous and the caller does not mutate params meanwhile.
    """
    th = ocp.type_handlers
    handlers = [(ty, th.get_type_handler(ty)) for ty in th.supported_types()
                if ty is not np.ndarray]
    handlers.append((np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)))
    return th.create_type_handler_registry(*handlers)


def save_params(path: PathLike, params: Mapping[str, Any]) -> None:
    """Write `params` (numpy or jax leaves) as a synchronous Orbax PyTree checkpoint.

    Stored uncompressed: zstd on (mostly incompressible) float weights saved <10% of disk
    but cost ~0.8x the model in extra RAM and 6x the time (measured, 0.9 GB model).
    """
    handler = ocp.PyTreeCheckpointHandler(use_compression=False,
                                          type_handler_registry=_no_copy_registry())
    ckptr = ocp.Checkpointer(handler)
    ckptr.save(Path(path).absolute(), args=ocp.args.PyTreeSave(dict(params)))


def _tree_of(metadata: Any) -> Any:
    """The metadata tree from whatever the installed Orbax returns for a pytree item."""
    for attr in ("item_metadata", "tree"):
        if hasattr(metadata, attr) and getattr(metadata, attr) is not None:
            metadata = getattr(metadata, attr)
    if hasattr(metadata, "tree"):
        metadata = metadata.tree
    return metadata


def _param_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """The params path of a checkpoint leaf (a Flax `Partitioned` box saves `.../value`)."""
    return path[:-1] if path and path[-1] == "value" else path


def _restore_arg(dtype: np.dtype | None, sharding: Any = None) -> Any:
    if sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
    return ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=sharding, dtype=dtype)


def _restore_leafwise(restore: Any, tree: Mapping[str, Any], dtype: np.dtype | None,
                      shardings: Mapping[str, Any] | None = None) -> dict:
    """Restore a metadata tree one leaf at a time with `restore(item, restore_args) -> tree`.

    Orbax reads all numpy leaves of a request concurrently, each through a transient buffer of
    its own size; one leaf per request bounds that overhead by the largest leaf (measured on a
    0.9 GB model: +0.13x instead of +0.27x of the model size, same speed). With `shardings` (a
    params-shaped tree of `jax.sharding.Sharding`) each leaf is read straight into its sharding
    as a `jax.Array`: every process reads only the shards its devices hold, and no full host
    copy of the model is ever made.
    """
    flat_shardings = flatten(shardings) if shardings is not None else {}
    out = {}
    for path, meta in flatten(tree).items():
        item = unflatten({path: meta})
        arg = _restore_arg(dtype, flat_shardings.get(_param_path(path)))
        restored = restore(item, unflatten({path: arg}))
        out[path] = flatten(restored)[path]
    return unflatten(out)


def restore_params(path: PathLike, dtype: Any = None, shardings: Any = None,
                   config: LlamaConfig | None = None) -> dict:
    """Read an Orbax PyTree checkpoint of params as numpy arrays (optionally cast), or as
    `jax.Array`s in `shardings`; with `config`, shapes are checked before reading."""
    path = Path(path).absolute()
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())

    def restore(item, restore_args):
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))

    try:
        tree = _tree_of(ckptr.metadata(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ModelIOError(f"cannot read the params checkpoint at {path}: {e}") from e
    if config is not None:  # before reading: restoring and casting keep shapes
        check_params(_unbox(tree), config, where=f"params in {path}")
    try:
        out = _restore_leafwise(restore, tree, resolve_dtype(dtype), shardings)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ModelIOError(f"cannot read the params checkpoint at {path}: {e}") from e
    return _unbox(out)


# ---------------------------------------------------------------------------------------------
# model dirs


def save_model_dir(out_dir: PathLike, params: Mapping[str, Any], config: LlamaConfig,
                   tokenizer_dir_or_files: PathLike | Iterable[PathLike] | None = None,
                   overwrite: bool = False) -> Path:
    """Atomically write a model dir (params checkpoint, config.json, tokenizer files)."""
    check_params(params, config)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        config.to_json_file(tmp / CONFIG_FILE)
        copy_tokenizer_files(tokenizer_dir_or_files, tmp)
        save_params(tmp / PARAMS_DIR, params)
    return Path(out_dir)


def is_model_dir(path: PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / PARAMS_DIR).is_dir()


def is_workdir(path: PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / CHECKPOINTS_DIR).is_dir()


def model_kind(path: PathLike, what: str = "checkpoint") -> str:
    """MODEL_DIR, WORKDIR, HF_DIR or GGUF_FILE: what `path` holds; anything else is refused
    with what it would need to be one."""
    p = Path(path)
    if not p.exists():
        raise ModelIOError(f"{what}: {p} does not exist")
    if is_model_dir(p):
        return MODEL_DIR
    if is_workdir(p):
        return WORKDIR
    if p.is_file():
        if gguf_file.is_gguf(p):
            return GGUF_FILE
        raise ModelIOError(f"{what}: {p} is a file but not a GGUF file (it does not start with "
                           f"{gguf_file.GGUF_MAGIC!r}); give a model dir, a training workdir, "
                           "an HF LLaMA dir or a .gguf file")
    if hf_checkpoint.has_hf_weights(p):
        return HF_DIR
    has = sorted(x.name for x in p.iterdir())
    config = (p / CONFIG_FILE).is_file()
    raise ModelIOError(
        f"{what} ({p}) is neither a model dir ({CONFIG_FILE} + {PARAMS_DIR}/) nor a training "
        f"workdir ({CONFIG_FILE} + {CHECKPOINTS_DIR}/) nor an HF LLaMA dir ({CONFIG_FILE} + "
        "model.safetensors, its shards or pytorch_model.bin) nor a GGUF file; it contains "
        f"{has[:12]}" + ("; if it is an HF model dir, its weights are missing: download them"
                         if config else f" and no {CONFIG_FILE}"))


def _read_config_json(path: Path) -> LlamaConfig:
    f = path / CONFIG_FILE
    if not f.is_file():
        raise ModelIOError(f"{f} is missing: a model dir / workdir needs the model's config.json")
    try:
        return LlamaConfig.from_json_file(f)
    except (ConfigError, ValueError, TypeError) as e:
        raise ModelIOError(f"{f} is not a usable LLaMA config: {e}") from e


def load_config(path: PathLike) -> LlamaConfig:
    """The model config of any model source: a model dir's or workdir's config.json, an HF
    dir's (with generation_config.json's EOS ids), a GGUF file's metadata. A dir with a
    config.json and no weights (yet) is read as its config.json (`--plan` needs no weights)."""
    p = Path(path)
    if p.is_dir() and (p / CONFIG_FILE).is_file():
        if not is_model_dir(p) and not is_workdir(p) and hf_checkpoint.has_hf_weights(p):
            return hf_checkpoint.read_hf_config(p)
        return _read_config_json(p)
    if model_kind(p, "model") == GGUF_FILE:  # anything else but a GGUF file raised
        return gguf_file.read_gguf_config(p)
    raise ModelIOError(f"{p} holds no model config")


def load_model_dir(path: PathLike, dtype: Any = None, shardings: Any = None
                   ) -> tuple[dict, LlamaConfig]:
    """(params, config) from a model dir: numpy arrays, or `jax.Array`s placed in `shardings`;
    `dtype` casts every leaf."""
    p = Path(path)
    if not is_model_dir(p):
        raise ModelIOError(f"{p} is not a model dir: it needs {CONFIG_FILE} and {PARAMS_DIR}/ "
                           "(write one with `python -m sorted_jax.convert hf-to-orbax`)")
    config = _read_config_json(p)
    return restore_params(p / PARAMS_DIR, dtype, shardings, config), config


# ---------------------------------------------------------------------------------------------
# training workdirs


def _manager(ckpt_dir: Path):
    """A read-only manager; Orbax's warnings about its read-only mode are silenced."""
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        return ocp.CheckpointManager(
            ckpt_dir,
            item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler(),
                           DATA_ITEM: ocp.JsonCheckpointHandler(),
                           META_ITEM: ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    finally:
        absl_logging.set_verbosity(verbosity)


def workdir_steps(workdir: PathLike) -> list[int]:
    """Steps with a finished checkpoint in `WORKDIR/checkpoints` (ascending)."""
    ckpt_dir = Path(workdir).absolute() / CHECKPOINTS_DIR
    if not ckpt_dir.is_dir():
        return []
    with contextlib.closing(_manager(ckpt_dir)) as mngr:
        return sorted(mngr.all_steps())


def read_workdir_meta(workdir: PathLike, step: int) -> dict:
    """The `meta` item of a workdir's checkpoint `step` (the run's record of that step)."""
    with contextlib.closing(_manager(Path(workdir).absolute() / CHECKPOINTS_DIR)) as mngr:
        args = ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
        return dict(mngr.restore(step, args=args)[META_ITEM] or {})


def load_workdir_params(workdir: PathLike, step: int | None = None, dtype: Any = None,
                        shardings: Any = None, merge_lora: bool = True
                        ) -> tuple[dict, LlamaConfig, int]:
    """(params, config, step) from a training workdir; only `params` is read from disk (as
    numpy, or as `jax.Array`s in `shardings`). A LoRA run's are its base with the adapters
    merged in (`lora_merge`; `merge_lora=False`: the adapters as saved)."""
    wd = Path(workdir).absolute()
    config = _read_config_json(wd)
    ckpt_dir = wd / CHECKPOINTS_DIR
    with contextlib.closing(_manager(ckpt_dir)) as mngr:
        steps = sorted(mngr.all_steps())
        if not steps:
            raise ModelIOError(f"{ckpt_dir} holds no finished checkpoint step; train longer or "
                               "point at another workdir")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ModelIOError(f"step {step} is not in {ckpt_dir}; available steps: {steps}")
        try:
            meta = mngr.item_metadata(step)[STATE_ITEM]
        except (KeyError, FileNotFoundError, ValueError) as e:
            raise ModelIOError(f"step {step} in {ckpt_dir} has no readable '{STATE_ITEM}' item "
                               f"(the Orbax train state): {e}") from e
        tree = _tree_of(meta)
        if not isinstance(tree, Mapping) or "params" not in tree:
            keys = list(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise ModelIOError(f"the '{STATE_ITEM}' item of step {step} in {ckpt_dir} has no "
                               f"'params' entry (found {keys})")

        def restore(item, restore_args):
            restored = mngr.restore(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.PyTreeRestore(
                    item={"params": item}, restore_args={"params": restore_args},
                    partial_restore=True)}))
            return restored[STATE_ITEM]["params"]

        where = f"step {step} of {wd}"
        if lora.has_adapters(_unbox(tree["params"])):
            trained = _unbox(_restore_leafwise(restore, tree["params"], None))
            record = lora_merge.BaseRecord.from_meta(read_workdir_meta(wd, step), where)
            if not merge_lora or record is None:
                return trained, config, step
            base, _, _ = load_params(lora_merge.require_base_path(record, where))
            params = lora_merge.merged(base, trained, record, where, resolve_dtype(dtype),
                                       shardings)
            check_params(params, config, where=where)
            return params, config, step
        check_params(_unbox(tree["params"]), config, where=f"params of step {step} in {ckpt_dir}")
        try:
            params = _restore_leafwise(restore, tree["params"], resolve_dtype(dtype), shardings)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ModelIOError(f"cannot read params of step {step} in {ckpt_dir}: {e}") from e
    return _unbox(params), config, step


def load_params(path: PathLike, step: int | None = None, dtype: Any = None,
                shardings: Any = None) -> tuple[dict, LlamaConfig, Path | None]:
    """(params, config, tokenizer source or None) from any model source (`model_kind`).

    For a workdir the latest step is read unless `step` is given. The tokenizer source is
    `path` itself when it holds tokenizer files (a workdir's `tokenizer/` subdir is also
    accepted; a GGUF file carries its own). With `shardings` (a params-shaped tree of
    shardings) the params come back as `jax.Array`s already in place: from our checkpoints each
    process reads only its own shards; from safetensors or a GGUF file each leaf is built on
    the host, placed and dropped before the next (`.bin` pickles are read whole, then placed
    leaf by leaf). HF and GGUF weights default to float32.
    """
    p = require_filesystem_path(path, "checkpoint")
    kind = model_kind(p)
    if step is not None and kind != WORKDIR:
        raise ModelIOError(f"{p} is a {kind} (a single set of weights); --step / step= "
                           "applies to training workdirs only")
    if kind == MODEL_DIR:
        params, config = load_model_dir(p, dtype, shardings)
        return params, config, (p if find_tokenizer_files(p) else None)
    if kind == WORKDIR:
        params, config, _ = load_workdir_params(p, step, dtype, shardings)
    elif kind == HF_DIR:
        params, config = hf_checkpoint.read_hf_checkpoint(
            p, dtype, progress=sys.stderr.isatty(), shardings=shardings)
    else:
        params, config = gguf_file.read_gguf(p, dtype, shardings, progress=sys.stderr.isatty())
    return params, config, find_tokenizer_dir(p)


__all__ = [
    "ModelIOError", "TOKENIZER_FILES", "atomic_dir", "check_params", "require_filesystem_path",
    "url_scheme",
    "GGUF_FILE", "HF_DIR", "MODEL_DIR", "WORKDIR",
    "copy_tokenizer_files", "dtype_name", "expected_param_shapes", "find_tokenizer_files",
    "flatten", "is_model_dir", "is_workdir", "load_config", "load_model_dir", "load_params",
    "load_workdir_params", "model_kind", "unflatten",
    "resolve_dtype", "restore_params", "save_model_dir", "save_params", "workdir_steps",
]
