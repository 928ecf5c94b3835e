"""HF PyTorch LLaMA <-> our Orbax model dir, and export of the depth-k sub-model.

    python -m sorted_jax.convert hf-to-orbax --hf HF_DIR --out MODEL_DIR [--dtype float32]
    python -m sorted_jax.convert orbax-to-hf --ckpt MODEL_DIR_OR_WORKDIR --out HF_DIR \
        [--exit-layer K] [--step N] [--dtype bfloat16] [--shard-size 2GB]

Both directions stream tensor by tensor, so peak memory is about one copy of the model plus
one tensor:

- hf-to-orbax reads safetensors files with plain `seek` + `readinto` (no mmap: mapped pages
  would count as a second resident copy), maps each tensor with `hf_tensor_to_ours` and writes
  it into preallocated stacked arrays. All names and shapes are validated from the safetensors
  headers before any data is read. `.bin` checkpoints load with `torch.load(weights_only=True)`;
  other pickles are refused unless `--allow-pickle`.
- orbax-to-hf restores params as numpy (for a training workdir, only the params), takes views
  of the first k layers and writes safetensors shards itself, one tensor at a time.

Outputs are written into a temp dir beside `--out` and renamed at the end: a failed conversion
leaves nothing at `--out`. Torch is imported only for `.bin` inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from tqdm import tqdm

from sorted_jax.core.errors import ConversionError, run_cli
from sorted_jax.io import artifacts, destinations, model_io
from sorted_jax.io.destinations import Destination, atomic_dir
from sorted_jax.io.model_io import (
    CONFIG_FILE,
    check_params,
    copy_tokenizer_files,
    dtype_name,
    expected_param_shapes,
    find_tokenizer_files,
    resolve_dtype,
    save_params,
    unflatten,
)
from sorted_jax.model.config import ConfigError, LlamaConfig
from sorted_jax.model.hf_mapping import (
    MappingError,
    as_numpy,
    expected_hf_names,
    hf_tensor_to_ours,
    iter_hf_tensors,
)
from sorted_jax.model.modeling import slice_layers
from sorted_jax.objective import heads

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
GENERATION_CONFIG_FILE = "generation_config.json"
HF_TO_ORBAX, ORBAX_TO_HF = "sorted_jax.convert hf-to-orbax", "sorted_jax.convert orbax-to-hf"
_MAX_LISTED = 12


def _bf16() -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16)


def _st_dtypes() -> dict[str, np.dtype]:
    return {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
            "F16": np.dtype(np.float16), "BF16": _bf16(),
            "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
            "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}


def _st_code(dtype: np.dtype) -> str:
    for code, dt in _st_dtypes().items():
        if dt == dtype:
            return code
    raise ConversionError(f"cannot write dtype {dtype} to safetensors")


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" ... and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------------------------
# safetensors: header parsing, streaming reads and writes


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and sanity-check a safetensors header (detects truncated / non-safetensors files)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000 or 8 + n > size:
            raise ConversionError(f"{path} is truncated or not a safetensors file (header of "
                                  f"{n} bytes, file of {size} bytes); re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path} has a corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{path} has a corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    dtypes = _st_dtypes()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = dtypes[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{path}: unreadable header entry for {name!r} "
                                  f"({info!r})") from e
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise ConversionError(f"{path}: tensor {name!r} claims {end - begin} bytes but shape "
                                  f"{shape} of {info['dtype']} needs {nbytes}; the file is corrupt")
        if data_start + end > size:
            raise ConversionError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the "
                f"file has {size} bytes; re-download or re-save it")
        out[name] = TensorEntry(path, name, dtype, shape, data_start + begin, nbytes)
    return out


def read_tensor(f, entry: TensorEntry) -> np.ndarray:
    """Read one tensor into a fresh array with seek + readinto (no mmap)."""
    arr = np.empty(entry.shape, entry.dtype)
    f.seek(entry.start)
    buf = arr.reshape(-1).view(np.uint8)
    got = f.readinto(memoryview(buf))
    if got != entry.nbytes:
        raise ConversionError(f"{entry.file} is truncated: tensor {entry.name!r} is short by "
                              f"{entry.nbytes - (got or 0)} bytes")
    return arr


def write_safetensors(path: Path, tensors: Sequence[tuple[str, np.ndarray]],
                      dtype: np.dtype | None = None, progress=None,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file streaming one tensor at a time (each cast to `dtype` if given)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, w in tensors:
        dt = np.dtype(dtype) if dtype is not None else w.dtype
        nbytes = math.prod(w.shape) * dt.itemsize
        header[name] = {"dtype": _st_code(dt), "shape": list(w.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, w in tensors:
            out = np.ascontiguousarray(w if dtype is None else w.astype(dtype, copy=False))
            f.write(memoryview(out.reshape(-1).view(np.uint8)))
            if progress is not None:
                progress.update(out.nbytes)
            del out


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'2GB' (10^9), '2GiB' (2^30), '500MB', '20KB', '1000' -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ConversionError(f"cannot parse size {text!r}; use e.g. 2GB, 500MB, 4GiB")
    value, unit = float(m.group(1)), (m.group(2) or "b").lower()
    base = 1024 if "i" in unit else 1000
    power = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
    size = int(value * base ** power)
    if size <= 0:
        raise ConversionError(f"shard size must be positive, got {text!r}")
    return size


# ---------------------------------------------------------------------------------------------
# tokenizer checks


def tokenizer_vocab_size(directory: Path) -> tuple[int, str] | None:
    """(number of token ids the tokenizer can emit, which file says so), or None if none."""
    best: tuple[int, str] | None = None

    def consider(n: int, what: str) -> None:
        nonlocal best
        if best is None or n > best[0]:
            best = (n, what)

    spm_file = directory / "tokenizer.model"
    if spm_file.is_file():
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(spm_file))
        except (OSError, RuntimeError) as e:
            raise ConversionError(f"{spm_file} is not a readable SentencePiece model: {e}") from e
        consider(sp.GetPieceSize(), str(spm_file))
    tok_json = directory / "tokenizer.json"
    if tok_json.is_file():
        try:
            tj = json.loads(tok_json.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{tok_json} is not valid JSON: {e}") from e
        vocab = (tj.get("model") or {}).get("vocab")
        ids: list[int] = []
        if isinstance(vocab, dict):
            ids += [int(i) for i in vocab.values()]
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], ids are positions
            ids.append(len(vocab) - 1)
        ids += [int(t["id"]) for t in tj.get("added_tokens") or [] if "id" in t]
        if ids:
            consider(max(ids) + 1, str(tok_json))
    tok_cfg = directory / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            added = json.loads(tok_cfg.read_text()).get("added_tokens_decoder") or {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{tok_cfg} is not valid JSON: {e}") from e
        if added:
            consider(max(int(i) for i in added) + 1, str(tok_cfg) + " (added_tokens_decoder)")
    return best


def check_tokenizer(directory: Path, config: LlamaConfig) -> None:
    found = tokenizer_vocab_size(directory)
    if found is not None and found[0] > config.vocab_size:
        raise ConversionError(
            f"the tokenizer ({found[1]}) has {found[0]} token ids but the model's vocab_size is "
            f"{config.vocab_size}: ids >= {config.vocab_size} would have no embedding. Use the "
            "tokenizer that belongs to this checkpoint (or fix vocab_size in config.json)")


# ---------------------------------------------------------------------------------------------
# HF -> ours


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=not enabled, leave=False)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e


def _shards_from_index(hf_dir: Path, index_name: str) -> tuple[list[Path], dict[str, str]]:
    index = _load_json(hf_dir / index_name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{hf_dir / index_name} has no 'weight_map'; the index is corrupt")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (hf_dir / f).is_file()]
    if missing:
        raise ConversionError(f"{hf_dir / index_name} lists shard files that are missing: "
                              f"{_listing(missing)}; download every shard")
    return [hf_dir / f for f in files], weight_map


def find_hf_weights(hf_dir: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    """('safetensors' | 'bin', files, weight_map or None), preferring safetensors."""
    if (hf_dir / SAFE_INDEX).is_file():
        return ("safetensors", *_shards_from_index(hf_dir, SAFE_INDEX))
    if (hf_dir / SAFE_SINGLE).is_file():
        return "safetensors", [hf_dir / SAFE_SINGLE], None
    shards = sorted(hf_dir.glob("model-*-of-*.safetensors"))
    if shards:
        return "safetensors", shards, None
    if (hf_dir / BIN_INDEX).is_file():
        return ("bin", *_shards_from_index(hf_dir, BIN_INDEX))
    if (hf_dir / BIN_SINGLE).is_file():
        return "bin", [hf_dir / BIN_SINGLE], None
    raise ConversionError(
        f"no weights found in {hf_dir}: expected {SAFE_SINGLE}, {SAFE_INDEX} with its shards, "
        f"{BIN_SINGLE} or {BIN_INDEX}")


def _present_problems(entries: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                      config: LlamaConfig) -> list[str]:
    """What is wrong with the tensors that are there (unexpected names, shapes, dtypes)."""
    problems: list[str] = []
    for name, (shape, dtype) in entries.items():
        try:
            hf_tensor_to_ours(name, np.broadcast_to(np.zeros((), np.float32), shape), config)
        except MappingError as e:
            problems.append(str(e))
            continue
        if not (np.issubdtype(dtype, np.floating) or dtype == _bf16()):
            problems.append(f"tensor {name!r} has dtype {dtype}, expected a float type")
    return problems


def _validate_names_and_shapes(entries: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                               config: LlamaConfig, where: str, complete: bool = True) -> None:
    """Raise naming every unexpected/misshaped tensor and (if `complete`) every missing one."""
    problems = _present_problems(entries, config)
    if complete:
        missing = [n for n in expected_hf_names(config) if n not in entries]
        if missing:
            problems.insert(0, f"{len(missing)} tensors missing: {_listing(missing)}")
    if problems:
        raise ConversionError(
            f"the weights in {where} do not match its config.json "
            f"(num_hidden_layers={config.num_hidden_layers}, hidden_size={config.hidden_size}, "
            f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}, "
            f"tie_word_embeddings={config.tie_word_embeddings}): " + "; ".join(
                problems[:_MAX_LISTED]) + (f"; ... and {len(problems) - _MAX_LISTED} more"
                                           if len(problems) > _MAX_LISTED else ""))


class _Filler:
    """Preallocated stacked arrays that HF tensors are written into, tracking what is filled."""

    def __init__(self, config: LlamaConfig, dtype: np.dtype):
        self.config = config
        self.shapes = expected_param_shapes(config)
        self.arrays = {p: np.empty(s, dtype) for p, s in self.shapes.items()}
        self.filled: set[tuple[tuple[str, ...], int | None]] = set()

    def put(self, name: str, w: np.ndarray) -> None:
        mapped = hf_tensor_to_ours(name, w, self.config)
        if mapped is None:
            return
        path, layer, ours = mapped
        key = (path, layer)
        if key in self.filled:
            raise ConversionError(f"tensor {name!r} appears twice in the checkpoint")
        if layer is None:
            self.arrays[path][...] = ours
        else:
            self.arrays[path][layer] = ours
        self.filled.add(key)

    def finish(self, where: str) -> dict:
        L = self.config.num_hidden_layers
        missing = [f"{'/'.join(p)}" + (f"[{i}]" if i is not None else "")
                   for p in self.shapes
                   for i in ((range(L)) if p[0] == "layers" else (None,))
                   if (p, i) not in self.filled]
        if missing:
            raise ConversionError(f"{where} is missing tensors for {_listing(missing)}")
        return unflatten(self.arrays)


def _read_safetensors(files: list[Path], weight_map: Mapping[str, str] | None,
                      config: LlamaConfig, dtype: np.dtype, hf_dir: Path,
                      progress: bool) -> dict:
    entries: dict[str, TensorEntry] = {}
    dupes = []
    for f in files:
        for name, e in read_safetensors_header(f).items():
            if name in entries:
                dupes.append(name)
            entries[name] = e
    if dupes:
        raise ConversionError(f"tensors stored in more than one shard in {hf_dir}: "
                              f"{_listing(dupes)}")
    if weight_map is not None:
        bad = [n for n, f in weight_map.items()
               if n not in entries or entries[n].file.name != Path(f).name]
        if bad:
            raise ConversionError(f"the index in {hf_dir} maps tensors to shards that do not "
                                  f"hold them: {_listing(bad)}; the download is incomplete")
    _validate_names_and_shapes({n: (e.shape, e.dtype) for n, e in entries.items()}, config,
                               str(hf_dir))
    filler = _Filler(config, dtype)
    total = sum(e.nbytes for e in entries.values())
    with _progress(total, "reading safetensors", progress) as bar:
        for f in files:
            in_file = sorted((e for e in entries.values() if e.file == f), key=lambda e: e.start)
            with open(f, "rb") as fh:
                for e in in_file:
                    filler.put(e.name, read_tensor(fh, e))
                    bar.update(e.nbytes)
    return filler.finish(str(hf_dir))


def _torch_load(path: Path, allow_pickle: bool) -> Mapping[str, Any]:
    import torch  # heavy optional package: only for .bin checkpoints

    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=mmap)

    try:
        try:
            sd = load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = load(mmap=False)  # legacy (non-zip) torch.save format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path} is not a weights-only PyTorch checkpoint: torch.load(weights_only=True) "
            f"refused it ({first}). Loading it would run arbitrary code from the file; convert "
            "it to safetensors, or pass --allow-pickle if you trust its origin") from e
    except Exception as e:  # corrupt zip, truncated file, ...
        raise ConversionError(f"cannot read {path} with torch.load: {e}") from e
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(hasattr(v, "shape") for v in sd.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors "
                              f"(got {type(sd).__name__})")
    return sd


def _read_bins(files: list[Path], config: LlamaConfig, dtype: np.dtype, hf_dir: Path,
               allow_pickle: bool, progress: bool) -> dict:
    filler = _Filler(config, dtype)
    seen: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    with _progress(len(files), "reading .bin shards", progress) as bar:
        for f in files:
            sd = _torch_load(f, allow_pickle)
            shapes = {}
            for n, t in sd.items():
                arr = as_numpy(t)
                shapes[n] = (tuple(arr.shape), arr.dtype)
            dupes = [n for n in shapes if n in seen]
            if dupes:
                raise ConversionError(f"tensors stored in more than one shard in {hf_dir}: "
                                      f"{_listing(dupes)}")
            seen.update(shapes)
            # Names and shapes of this shard are checked before any is copied.
            _validate_names_and_shapes(shapes, config, str(f), complete=False)
            for n, t in sd.items():
                filler.put(n, as_numpy(t))
            del sd
            bar.update(1)
    _validate_names_and_shapes(seen, config, str(hf_dir))
    return filler.finish(str(hf_dir))


def with_generation_eos(config: LlamaConfig, hf_dir: Path) -> LlamaConfig:
    """`config` with the EOS id(s) of `hf_dir`'s generation_config.json, which HF `generate`
    stops on (Llama-3-Instruct lists several there: 128001, 128008, 128009) and which may
    differ from config.json's; kept as a list when it is one."""
    f = hf_dir / GENERATION_CONFIG_FILE
    if not f.is_file():
        return config
    gen = _load_json(f)
    eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
    if eos is None:
        return config
    ids = eos if isinstance(eos, list) else [eos]
    if not ids or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
        raise ConversionError(f"{f}: eos_token_id must be a token id or a list of them, got "
                              f"{eos!r}")
    return config.replace(eos_token_id=eos)


def read_hf_checkpoint(hf_dir: str | Path, dtype: Any = "float32", allow_pickle: bool = False,
                       progress: bool = True) -> tuple[dict, LlamaConfig]:
    """(params as numpy arrays in our layout, config) from an HF LLaMA directory."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"HF model dir {hf_dir} does not exist")
    cfg_file = hf_dir / CONFIG_FILE
    if not cfg_file.is_file():
        raise ConversionError(f"{cfg_file} is missing: an HF model dir needs its config.json")
    try:
        config = LlamaConfig.from_hf_dict(_load_json(cfg_file))
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"{cfg_file} is not a usable LLaMA config: {e}") from e
    config = with_generation_eos(config, hf_dir)
    check_tokenizer(hf_dir, config)
    kind, files, weight_map = find_hf_weights(hf_dir)
    np_dtype = resolve_dtype(dtype) or np.dtype(np.float32)
    if kind == "safetensors":
        params = _read_safetensors(files, weight_map, config, np_dtype, hf_dir, progress)
    else:
        params = _read_bins(files, config, np_dtype, hf_dir, allow_pickle, progress)
    return params, config


def hf_to_orbax(hf_dir: str | Path, out_dir: str | Path, dtype: Any = "float32",
                allow_pickle: bool = False, overwrite: bool = False,
                progress: bool = True) -> Path:
    """Convert an HF LLaMA dir into a model dir (atomic; tokenizer files copied).

    `out_dir` is checked first (`destinations.claim_dir`): never the input or inside it, and
    `overwrite` replaces only a model dir this command wrote."""
    dest = destinations.claim_dir(out_dir, flag="--out", command=HF_TO_ORBAX, inputs=[hf_dir],
                                  overwrite=overwrite, recognise=_is_plain_model_dir)
    params, config = read_hf_checkpoint(hf_dir, dtype, allow_pickle, progress)
    check_params(params, config)
    with atomic_dir(dest) as tmp:
        config.to_json_file(tmp / CONFIG_FILE)
        copy_tokenizer_files(find_tokenizer_files(hf_dir), tmp)
        save_params(tmp / "params", params)
    return Path(out_dir)


def _is_plain_model_dir(path: Path) -> bool:
    """A model dir as hf-to-orbax writes it (before markers existed): no ICT heads, no HF
    weights beside the Orbax params."""
    return (model_io.is_model_dir(path) and not heads.has_heads(path)
            and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")))


# ---------------------------------------------------------------------------------------------
# ours -> HF


def _numpy_tree(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _numpy_tree(v) for k, v in tree.items()}
    return tree if isinstance(tree, np.ndarray) else np.asarray(tree)


def plan_shards(tensors: Sequence[tuple[str, np.ndarray]], dtype: np.dtype | None,
                max_shard_bytes: int) -> list[list[tuple[str, np.ndarray]]]:
    """Greedy HF-style sharding: start a new shard when the next tensor would overflow."""
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for name, w in tensors:
        nbytes = math.prod(w.shape) * (np.dtype(dtype) if dtype else w.dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, w))
        size += nbytes
    return shards


def hf_config_dict(config: LlamaConfig, dtype: np.dtype) -> dict:
    d = config.to_hf_dict()
    d["dtype"] = d["torch_dtype"] = dtype_name(dtype)
    return d


def generation_config_dict(config: LlamaConfig) -> dict:
    d = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
         if getattr(config, k) is not None}
    return d


def write_hf_dir(tmp: Path, params: Mapping[str, Any], config: LlamaConfig,
                 dtype: np.dtype | None, max_shard_bytes: int, progress: bool = True) -> None:
    """Write safetensors shards + index, config.json and generation_config.json into `tmp`."""
    tensors = list(iter_hf_tensors(params, config))  # views into params, no copies
    out_dtype = dtype or np.result_type(*[w.dtype for _, w in tensors])
    shards = plan_shards(tensors, dtype, max_shard_bytes)
    total = sum(math.prod(w.shape) * (dtype or w.dtype).itemsize for _, w in tensors)
    weight_map = {}
    with _progress(total, "writing safetensors", progress) as bar:
        for i, shard in enumerate(shards):
            fname = (SAFE_SINGLE if len(shards) == 1
                     else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
            write_safetensors(tmp / fname, shard, dtype, bar)
            weight_map.update({name: fname for name, _ in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / CONFIG_FILE).write_text(
        json.dumps(hf_config_dict(config, out_dtype), indent=2, sort_keys=True) + "\n")
    (tmp / GENERATION_CONFIG_FILE).write_text(
        json.dumps(generation_config_dict(config), indent=2) + "\n")


def _check_exit_layer(k: int, config: LlamaConfig) -> None:
    L = config.num_hidden_layers
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= L:
        raise ConversionError(f"--exit-layer must be in 1..{L} (the model has {L} layers), "
                              f"got {k}")


def export_hf(params: Mapping[str, Any], config: LlamaConfig, out_dir: str | Path | Destination,
              exit_layer: int | None = None, dtype: Any = None, shard_size: str | int = "2GB",
              tokenizer: str | Path | Iterable[str | Path] | None = None,
              overwrite: bool = False, progress: bool = True) -> Path:
    """Write params (or the sub-model of depth `exit_layer`) as an HF LlamaForCausalLM dir
    (`out_dir` a path, or a `Destination` that `orbax_to_hf` checked)."""
    L = config.num_hidden_layers
    k = L if exit_layer is None else exit_layer
    _check_exit_layer(k, config)
    max_bytes = parse_size(shard_size)
    np_dtype = resolve_dtype(dtype)
    params = _numpy_tree(params)
    check_params(params, config)
    sub_config = config.submodel(k)
    sub_params = slice_layers(params, 0, k) if k < L else params
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_hf_dir(tmp, sub_params, sub_config, np_dtype, max_bytes, progress)
        if tokenizer is not None:
            copy_tokenizer_files(tokenizer, tmp)
    return out_dir.path if isinstance(out_dir, Destination) else Path(out_dir)


def orbax_to_hf(ckpt: str | Path, out_dir: str | Path, exit_layer: int | None = None,
                step: int | None = None, dtype: Any = None, shard_size: str | int = "2GB",
                overwrite: bool = False, progress: bool = True) -> Path:
    """Model dir or training workdir -> HF dir (depth `exit_layer` sub-model if given).

    `out_dir` is checked first: never the checkpoint or inside it, and `overwrite` replaces
    only an HF dir this command wrote (its marker)."""
    out = destinations.claim_dir(out_dir, flag="--out", command=ORBAX_TO_HF, inputs=[ckpt],
                                 overwrite=overwrite)
    parse_size(shard_size)
    resolve_dtype(dtype)
    art = artifacts.inspect(ckpt)
    if exit_layer is not None:
        _check_exit_layer(exit_layer, art.config)  # before reading any weights
    params = art.load_params(step)
    return export_hf(params, art.config, out, exit_layer, dtype, shard_size, art.tokenizer_dir,
                     overwrite, progress)


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sorted_jax.convert",
        description="Convert LLaMA weights between HF PyTorch and sorted_jax model dirs.")
    sub = parser.add_subparsers(dest="command", required=True)

    h2o = sub.add_parser("hf-to-orbax", help="HF LLaMA dir -> model dir (Orbax params)")
    h2o.add_argument("--hf", required=True, help="HF dir with config.json and weights")
    h2o.add_argument("--out", required=True, help="model dir to create")
    h2o.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                     help="dtype of the stored params (default float32: fp32 master weights)")
    h2o.add_argument("--allow-pickle", action="store_true",
                     help="UNSAFE: load .bin files that are not weights-only (runs their code)")
    h2o.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    h2o.add_argument("--no-progress", action="store_true", help="no progress bar")

    o2h = sub.add_parser("orbax-to-hf", help="model dir or training workdir -> HF LLaMA dir")
    o2h.add_argument("--ckpt", required=True, help="model dir or training workdir")
    o2h.add_argument("--out", required=True, help="HF dir to create")
    o2h.add_argument("--exit-layer", type=int, default=None,
                     help="export the sub-model of the first k layers (default: all)")
    o2h.add_argument("--step", type=int, default=None,
                     help="training step to export (workdirs only; default: latest)")
    o2h.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                     help="dtype of the written tensors (default: as stored)")
    o2h.add_argument("--shard-size", default="2GB",
                     help="max bytes per safetensors shard, e.g. 2GB, 500MB (default 2GB)")
    o2h.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    o2h.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "hf-to-orbax":
        out = hf_to_orbax(args.hf, args.out, args.dtype, args.allow_pickle, args.overwrite,
                          not args.no_progress)
    else:
        out = orbax_to_hf(args.ckpt, args.out, args.exit_layer, args.step, args.dtype,
                          args.shard_size, args.overwrite, not args.no_progress)
    print(f"wrote {out}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(f"sorted_jax.convert {args.command}", run, args)


if __name__ == "__main__":
    sys.exit(main())
