"""An HF checkpoint's tensors, streamed one at a time into our stacked params.

Peak memory is one copy of the model (preallocated arrays in our layout, `ParamFiller`) plus
one tensor. With shardings (a model loaded for training or decoding rather than converted),
the params are built one leaf at a time (`hf_leaves`) and each leaf goes straight into its
shards (`param_tree.place_leaves`): the host then holds one stacked leaf, not the model.
`gguf` streams a GGUF file's tensors through the same two paths.

- safetensors files are read with the `safetensors` library's `pread` backend, tensor by
  tensor (not its default mmap: pages mapped while a file is open count as resident, a second
  copy of the model). Every name, shape and dtype is validated from the headers of all files
  before any tensor data is read. bf16 arrives as `ml_dtypes.bfloat16` and is cast exactly.
- `.bin` files load with `torch.load(weights_only=True)` (mmap'd, one file at a time); other
  pickles are refused unless `allow_pickle`, since loading them runs code from the file.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from sorted_jax.core.errors import ConversionError
from sorted_jax.io.param_tree import Path_, expected_param_shapes, place_leaves, unflatten
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.hf_mapping import (
    MappingError,
    as_numpy,
    expected_hf_names,
    hf_tensor_to_ours,
)

_MAX_LISTED = 12
_BF16 = np.dtype(ml_dtypes.bfloat16)
# safetensors dtype codes numpy can hold; any other is reported by its code.
_NUMPY_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
                 "F16": np.dtype(np.float16), "BF16": _BF16, "I64": np.dtype(np.int64),
                 "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
                 "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}

# name -> (shape, numpy dtype, or the safetensors code of a dtype numpy cannot hold)
Shapes = Mapping[str, tuple[tuple[int, ...], np.dtype | str]]


def listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" ... and {more} more" if more > 0 else "")


def _is_float(dtype: np.dtype | str) -> bool:
    return isinstance(dtype, np.dtype) and (np.issubdtype(dtype, np.floating) or dtype == _BF16)


def _present_problems(entries: Shapes, config: LlamaConfig) -> list[str]:
    """What is wrong with the tensors that are there (unexpected names, shapes, dtypes)."""
    problems: list[str] = []
    for name, (shape, dtype) in entries.items():
        try:
            hf_tensor_to_ours(name, np.broadcast_to(np.zeros((), np.float32), shape), config)
        except MappingError as e:
            problems.append(str(e))
            continue
        if not _is_float(dtype):
            problems.append(f"tensor {name!r} has dtype {dtype}, expected a float type")
    return problems


def validate_names_and_shapes(entries: Shapes, config: LlamaConfig, where: str,
                              complete: bool = True, config_source: str = "config.json") -> None:
    """Raise naming every unexpected/misshaped tensor and (if `complete`) every missing one."""
    problems = _present_problems(entries, config)
    if complete:
        missing = [n for n in expected_hf_names(config) if n not in entries]
        if missing:
            problems.insert(0, f"{len(missing)} tensors missing: {listing(missing)}")
    if problems:
        raise ConversionError(
            f"the weights in {where} do not match its {config_source} "
            f"(num_hidden_layers={config.num_hidden_layers}, hidden_size={config.hidden_size}, "
            f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}, "
            f"tie_word_embeddings={config.tie_word_embeddings}): " + "; ".join(
                problems[:_MAX_LISTED]) + (f"; ... and {len(problems) - _MAX_LISTED} more"
                                           if len(problems) > _MAX_LISTED else ""))


class ParamFiller:
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
            raise ConversionError(f"{where} is missing tensors for {listing(missing)}")
        return unflatten(self.arrays)


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "B") -> tqdm:
    scaled = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scaled, unit_divisor=1024,
                file=sys.stderr, disable=not enabled, leave=False)


# ---------------------------------------------------------------------------------------------
# safetensors


def _open(path: Path) -> Any:
    """A `safe_open` handle that reads with pread; a damaged file is one clear error."""
    size = path.stat().st_size
    if size < 8:
        raise ConversionError(f"{path} is not a safetensors file (only {size} bytes)")
    try:
        return safe_open(path, framework="numpy", backend="pread")
    except SafetensorError as e:
        if "incomplete metadata" in str(e):  # the header's tensors do not end where the file does
            raise ConversionError(f"{path} is truncated: its header describes tensor data that "
                                  f"its {size} bytes do not match ({e}); re-download or "
                                  "re-save it") from e
        raise ConversionError(f"{path} is truncated or not a safetensors file ({e}); "
                              "re-download or re-save it") from e


def _header(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype | str]]:
    """name -> (shape, dtype) of every tensor in a safetensors file, reading no tensor data."""
    with _open(path) as f:
        out = {}
        for name in f.offset_keys():
            view = f.get_slice(name)
            code = view.get_dtype()
            out[name] = (tuple(view.get_shape()), _NUMPY_DTYPES.get(code, code))
        return out


def _safetensors_entries(files: list[Path], weight_map: Mapping[str, str] | None,
                         config: LlamaConfig, hf_dir: Path
                         ) -> tuple[dict[str, tuple[tuple[int, ...], Any]], dict[str, Path]]:
    """(name -> (shape, dtype), name -> file) from the headers, every name/shape/dtype and the
    index checked before any tensor is read."""
    entries: dict[str, tuple[tuple[int, ...], np.dtype | str]] = {}
    file_of: dict[str, Path] = {}
    dupes = []
    for f in files:
        for name, entry in _header(f).items():
            if name in entries:
                dupes.append(name)
            entries[name], file_of[name] = entry, f
    if dupes:
        raise ConversionError(f"tensors stored in more than one shard in {hf_dir}: "
                              f"{listing(dupes)}")
    if weight_map is not None:
        bad = [n for n, f in weight_map.items()
               if n not in entries or file_of[n].name != Path(f).name]
        if bad:
            raise ConversionError(f"the index in {hf_dir} maps tensors to shards that do not "
                                  f"hold them: {listing(bad)}; the download is incomplete")
    validate_names_and_shapes(entries, config, str(hf_dir))
    return entries, file_of


def read_safetensors(files: list[Path], weight_map: Mapping[str, str] | None,
                     config: LlamaConfig, dtype: np.dtype, hf_dir: Path,
                     progress: bool, shardings: Any = None) -> dict:
    """Params in our layout from safetensors shards (`weight_map`: the index, if any): numpy
    arrays read in file order, or with `shardings` `jax.Array`s built one stacked leaf at a
    time (`hf_leaves`), so the host never holds more than one leaf."""
    entries, file_of = _safetensors_entries(files, weight_map, config, hf_dir)
    total = sum(int(np.prod(s)) * d.itemsize for s, d in entries.values())
    with progress_bar(total, "reading safetensors", progress) as bar:
        if shardings is not None:
            with contextlib.ExitStack() as stack:
                handles = {f: stack.enter_context(_open(f)) for f in files}

                def read(name: str) -> np.ndarray:
                    w = _read(handles[file_of[name]], file_of[name], name)
                    bar.update(w.nbytes)
                    return w

                shapes = {n: shape for n, (shape, _) in entries.items()}
                return place_leaves(hf_leaves(read, shapes, config, dtype, str(hf_dir)),
                                    shardings)
        filler = ParamFiller(config, dtype)
        for f in files:
            with _open(f) as handle:
                for name in handle.offset_keys():  # in file order: sequential reads
                    w = _read(handle, f, name)
                    filler.put(name, w)
                    bar.update(w.nbytes)
                    del w
    return filler.finish(str(hf_dir))


def hf_leaves(read: Callable[[str], np.ndarray], shapes: Mapping[str, tuple[int, ...]],
              config: LlamaConfig, dtype: np.dtype, where: str
              ) -> Iterator[tuple[Path_, np.ndarray]]:
    """(path, host array) of every leaf of our params, one at a time: each built from the HF
    tensors (name -> shape in `shapes`, already validated; read with `read`) that map to it,
    e.g. a stacked leaf from its layers."""
    sources: dict[Path_, list[tuple[int | None, str]]] = {}
    for name, shape in shapes.items():
        probe = np.broadcast_to(np.zeros((), np.float32), shape)
        mapped = hf_tensor_to_ours(name, probe, config)
        if mapped is not None:
            sources.setdefault(mapped[0], []).append((mapped[1], name))
    L = config.num_hidden_layers
    for path, shape in expected_param_shapes(config).items():
        got = sources.get(path, [])
        want = list(range(L)) if path[0] == "layers" else [None]
        missing = [i for i in want if i not in {layer for layer, _ in got}]
        if missing:
            raise ConversionError(f"{where} is missing tensors for {'/'.join(path)}"
                                  + (f" (layers {missing})" if path[0] == "layers" else ""))
        host = np.empty(shape, dtype)
        for layer, name in got:
            _, _, ours = hf_tensor_to_ours(name, read(name), config)
            if layer is None:
                host[...] = ours
            else:
                host[layer] = ours
        yield path, host
        del host


def _read(handle: Any, path: Path, name: str) -> np.ndarray:
    try:
        return handle.get_tensor(name)
    except SafetensorError as e:
        raise ConversionError(f"cannot read tensor {name!r} from {path}: {e}") from e


# ---------------------------------------------------------------------------------------------
# .bin (PyTorch pickles)


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
            "it to safetensors, or, if you trust its origin, convert it with `python -m "
            "sorted_jax.convert hf-to-orbax --allow-pickle`") from e
    except Exception as e:  # corrupt zip, truncated file, ...
        raise ConversionError(f"cannot read {path} with torch.load: {e}") from e
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(hasattr(v, "shape") for v in sd.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors "
                              f"(got {type(sd).__name__})")
    return sd


def read_bins(files: list[Path], config: LlamaConfig, dtype: np.dtype, hf_dir: Path,
              allow_pickle: bool, progress: bool) -> dict:
    """Params in our layout from `.bin` shards, each validated before any is copied."""
    filler = ParamFiller(config, dtype)
    seen: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    with progress_bar(len(files), "reading .bin shards", progress, unit="file") as bar:
        for f in files:
            sd = _torch_load(f, allow_pickle)
            shapes = {}
            for n, t in sd.items():
                arr = as_numpy(t)
                shapes[n] = (tuple(arr.shape), arr.dtype)
            dupes = [n for n in shapes if n in seen]
            if dupes:
                raise ConversionError(f"tensors stored in more than one shard in {hf_dir}: "
                                      f"{listing(dupes)}")
            seen.update(shapes)
            validate_names_and_shapes(shapes, config, str(f), complete=False)
            for n, t in sd.items():
                filler.put(n, as_numpy(t))
            del sd
            bar.update(1)
    validate_names_and_shapes(seen, config, str(hf_dir))
    return filler.finish(str(hf_dir))
