"""A GGUF file (llama.cpp, Ollama, LM Studio) of a LLaMA-architecture model, read as a model
source like an HF dir: its config from the metadata, its tensors dequantised one at a time.

    model = open_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # metadata and tensor table only
    model.config                                         # LlamaConfig (`gguf_config`)
    params, config = read_gguf(path, dtype="float32")    # our params tree, numpy
    params, config = read_gguf(path, shardings=tree)     # jax.Arrays, one leaf at a time

The file is parsed with the `gguf` package (the reader of llama.cpp's own Python tools; the
`gguf` extra) and its tensors dequantised with its `gguf.quants.dequantize`. Tensor types:
F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; any other is
refused by name before anything is read.

llama.cpp names tensors `token_embd`, `blk.N.attn_q`, ... (mapped to HF's names here, then to
ours by `model.hf_mapping`), and its converter permutes the rows of `attn_q` / `attn_k` for its
interleaved rotary layout; that permutation is undone here, row by row, so the weights equal
the HF model the GGUF was made from (as transformers' own GGUF loader does).

Memory: tensor bytes are read with plain file reads at their offsets (not the reader's memmap,
whose touched pages would count as resident: a second copy of the model), and dequantised in
row chunks into the tensor's float32 array: the peak is the model in our layout (`ParamFiller`)
plus one tensor's quantised bytes, its float32 values and one chunk. With shardings the model
is built one stacked leaf at a time instead (`hf_weights.hf_leaves`).

The tokenizer a GGUF carries (SentencePiece or BPE vocabulary, special ids, chat template) is
rebuilt by `data.gguf_tokenizer` (`data.tokenizers.load_tokenizer` takes a .gguf).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any

import numpy as np

from sorted_jax.core.errors import ConversionError, ModelIOError
from sorted_jax.io.gguf_config import check_architecture, config_from_metadata
from sorted_jax.io.hf_weights import (
    ParamFiller,
    hf_leaves,
    listing,
    progress_bar,
    validate_names_and_shapes,
)
from sorted_jax.io.param_tree import place_leaves, resolve_dtype
from sorted_jax.model.config import LlamaConfig

GGUF_MAGIC = b"GGUF"
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K")
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling factors (read into the config)
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
                "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
_CHUNK_BYTES = 16 << 20  # float32 output per dequantised chunk of rows (gguf needs a few
# times that in temporaries)


def is_gguf(path: str | Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def hf_name(gguf_name: str) -> str | None:
    """HF's name of a llama.cpp tensor name, or None for a name it does not know."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def gguf_package() -> Any:
    try:
        import gguf  # optional extra: only for GGUF files
    except ImportError:
        raise ModelIOError("reading GGUF files needs the gguf package: pip install -e "
                           "'.[gguf]' (or pip install gguf)") from None
    return gguf


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str  # llama.cpp's
    qtype: str  # "Q4_K", "F32", ...
    shape: tuple[int, ...]  # numpy order (HF's): (rows, ..., ne0)
    offset: int  # absolute byte offset of its data in the file
    nbytes: int
    heads: int | None  # attn_q / attn_k: the heads whose rows llama.cpp permuted


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """A GGUF file's config and tensor table (HF name -> tensor), validated; no tensor data."""

    path: Path
    config: LlamaConfig
    tensors: dict[str, GGUFTensor]

    def read(self, name: str) -> np.ndarray:
        """The float32 values of HF tensor `name`, in HF's layout (q/k rows un-permuted)."""
        t = self.tensors[name]
        raw = _read_bytes(self.path, t)
        return _dequantize(raw, t)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: t.shape for n, t in self.tensors.items()}


def _read_bytes(path: Path, t: GGUFTensor) -> np.ndarray:
    raw = np.fromfile(path, dtype=np.uint8, count=t.nbytes, offset=t.offset)
    if raw.size != t.nbytes:
        raise ConversionError(f"{path} is truncated: tensor {t.name!r} needs bytes up to "
                              f"{t.offset + t.nbytes}, the file has {path.stat().st_size}; "
                              "re-download it")
    return raw


def _dequantize(raw: np.ndarray, t: GGUFTensor) -> np.ndarray:
    """Dequantise in chunks of rows into one float32 array, writing each row where the
    un-permuted tensor has it."""
    gguf = gguf_package()
    qtype = gguf.GGMLQuantizationType[t.qtype]
    ne0 = t.shape[-1]
    rows = int(np.prod(t.shape[:-1], dtype=np.int64))
    raw = raw.reshape(rows, -1)
    out = np.empty((rows, ne0), np.float32)
    dest = None if t.heads is None else _unpermuted_rows(rows, t.heads)
    step = max(1, _CHUNK_BYTES // (4 * ne0))
    for r0 in range(0, rows, step):
        chunk = gguf.quants.dequantize(raw[r0:r0 + step], qtype)
        if dest is None:
            out[r0:r0 + step] = chunk
        else:
            out[dest[r0:r0 + step]] = chunk
        del chunk
    return out.reshape(t.shape)


def _unpermuted_rows(rows: int, heads: int) -> np.ndarray:
    """Where each stored row of a permuted q/k weight goes in HF's layout.

    llama.cpp's converter stores `w.reshape(heads, 2, d, -1).swapaxes(1, 2)` (HF's rotate-half
    halves interleaved into pairs); stored row (h, i, j) is HF row (h, j, i).
    """
    half = rows // heads // 2
    hf_of_stored = np.arange(rows).reshape(heads, 2, half).swapaxes(1, 2).reshape(-1)
    return hf_of_stored


def _open_reader(path: Path) -> Any:
    gguf = gguf_package()
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is truncated or not a valid GGUF file (the gguf reader "
                              f"failed: {str(e).splitlines()[0][:160]}); re-download it") from None


def _tensor_table(path: Path, reader: Any) -> tuple[dict[str, GGUFTensor], Any]:
    """(HF name -> tensor, the rope_freqs tensor or None): every name and type checked, and
    every tensor's data inside the file."""
    size = path.stat().st_size
    unknown, unsupported, table, rope_freqs = [], [], {}, None
    for t in reader.tensors:
        qtype = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise ConversionError(f"{path} is truncated: tensor {t.name!r} needs bytes up to "
                                  f"{int(t.data_offset) + int(t.n_bytes)}, the file has {size}; "
                                  "re-download it")
        if qtype not in SUPPORTED_TYPES:
            unsupported.append(f"{t.name} ({qtype})")
        entry = GGUFTensor(t.name, qtype, shape, int(t.data_offset), int(t.n_bytes), None)
        if t.name == ROPE_FREQS:
            rope_freqs = entry
            continue
        name = hf_name(t.name)
        if name is None:
            unknown.append(t.name)
        else:
            table[name] = entry
    if unsupported:
        raise ConversionError(
            f"{path} holds tensors of a type sorted_jax cannot dequantise: "
            f"{listing(unsupported)}; supported: {', '.join(SUPPORTED_TYPES)} (re-quantise with "
            "llama.cpp's llama-quantize, e.g. to Q4_K_M, or pick another file of the model)")
    if unknown:
        raise ConversionError(f"{path} holds tensors a LLaMA model does not have: "
                              f"{listing(unknown)}")
    return table, rope_freqs


def _metadata(reader: Any) -> dict[str, Any]:
    """Every metadata value except the tokenizer's long arrays (vocabulary, merges, scores)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and len(field.types) > 1:
            out[key] = len(field.data)  # an array: only its length is needed here
            continue
        out[key] = field.contents()
    return out


@functools.lru_cache(maxsize=4)
def _open_cached(path: Path, size: int, mtime_ns: int) -> GGUFModel:
    reader = _open_reader(path)
    meta = _metadata(reader)
    check_architecture(meta, path)
    table, rope_freqs = _tensor_table(path, reader)
    del reader  # its memmap; tensor data is read with plain file reads
    freqs = None
    if rope_freqs is not None:
        freqs = _dequantize(_read_bytes(path, rope_freqs), rope_freqs).reshape(-1)
    config = config_from_metadata(meta, {n: t.shape for n, t in table.items()}, freqs, path)
    for name, t in table.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = (config.num_attention_heads if name.endswith("q_proj.weight")
                     else config.kv_heads)
            table[name] = dataclasses.replace(t, heads=heads)
    validate_names_and_shapes({n: (t.shape, np.dtype(np.float32)) for n, t in table.items()},
                              config, str(path), config_source="GGUF metadata")
    return GGUFModel(path, config, table)


def open_gguf(path: str | Path) -> GGUFModel:
    """The config and tensor table of a GGUF file, checked (cached while the file is unchanged:
    a command inspects a checkpoint, then loads it)."""
    p = Path(path).absolute()
    if not p.is_file():
        raise ModelIOError(f"GGUF file {p} does not exist")
    if not is_gguf(p):
        with open(p, "rb") as f:
            head = f.read(4)
        raise ConversionError(f"{p} is not a GGUF file: it starts with {head!r}, not "
                              f"{GGUF_MAGIC!r}")
    st = p.stat()
    return _open_cached(p, st.st_size, st.st_mtime_ns)


def read_gguf_config(path: str | Path) -> LlamaConfig:
    return open_gguf(path).config


def read_gguf(path: str | Path, dtype: Any = "float32", shardings: Any = None,
              progress: bool = False) -> tuple[dict, LlamaConfig]:
    """(params in our layout, config) from a GGUF file: numpy arrays of `dtype` read in file
    order, or with `shardings` `jax.Array`s placed one leaf at a time."""
    model = open_gguf(path)
    np_dtype = resolve_dtype(dtype) or np.dtype(np.float32)
    total = sum(t.nbytes for t in model.tensors.values())
    where = str(model.path)
    with progress_bar(total, "reading GGUF", progress) as bar:
        def read(name: str) -> np.ndarray:
            w = model.read(name)
            bar.update(model.tensors[name].nbytes)
            return w

        if shardings is not None:
            leaves = hf_leaves(read, model.shapes, model.config, np_dtype, where)
            return place_leaves(leaves, shardings), model.config
        filler = ParamFiller(model.config, np_dtype)
        for name in sorted(model.tensors, key=lambda n: model.tensors[n].offset):
            w = read(name)
            filler.put(name, w)
            del w
        return filler.finish(where), model.config
