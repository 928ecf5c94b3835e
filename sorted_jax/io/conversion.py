"""The two conversions of `python -m sorted_jax.convert`, each checked before it reads.

- `hf_to_orbax`: an HF LLaMA dir or a GGUF file -> a model dir (`hf_checkpoint` / `gguf_file`
  read, `model_io` writes; a GGUF's tokenizer is written as HF tokenizer files).
- `orbax_to_hf`: any checkpoint (`artifacts.inspect`: a model dir, training workdir, HF dir or
  GGUF file) -> an HF dir, whole or the depth-k sub-model (`hf_export`); a LoRA run's workdir
  is its merged model.
- `orbax_to_peft`: a LoRA run's workdir -> an HF PEFT adapter dir (`peft_export`).

`--out` is claimed first (`destinations.claim_dir`): never an input or inside one, and
`overwrite` replaces only a dir this command wrote. Outputs are written into a temp sibling
and renamed at the end, so a failed conversion leaves nothing at `--out`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sorted_jax.io import (
    artifacts,
    destinations,
    gguf_file,
    hf_export,
    ict_dir,
    model_io,
    peft_export,
)
from sorted_jax.io.destinations import atomic_dir
from sorted_jax.io.hf_checkpoint import read_hf_checkpoint
from sorted_jax.io.model_io import (
    CONFIG_FILE,
    check_params,
    copy_tokenizer_files,
    find_tokenizer_files,
    resolve_dtype,
    save_params,
)
from sorted_jax.io.safetensors_shards import parse_size

# The commands' names: in messages, and in the marker that lets `--overwrite` recognise
# their own outputs on disk.
HF_TO_ORBAX, ORBAX_TO_HF = "sorted_jax.convert hf-to-orbax", "sorted_jax.convert orbax-to-hf"


def _is_plain_model_dir(path: Path) -> bool:
    """A model dir as hf-to-orbax writes it (before markers existed): no ICT heads, no HF
    weights beside the Orbax params."""
    return (model_io.is_model_dir(path) and not ict_dir.has_heads(path)
            and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")))


def hf_to_orbax(hf_dir: str | Path, out_dir: str | Path, dtype: Any = "float32",
                allow_pickle: bool = False, overwrite: bool = False,
                progress: bool = True) -> Path:
    """Convert an HF LLaMA dir or a GGUF file into a model dir (atomic; tokenizer files copied,
    or rebuilt from the GGUF)."""
    dest = destinations.claim_dir(out_dir, flag="--out", command=HF_TO_ORBAX, inputs=[hf_dir],
                                  overwrite=overwrite, recognise=_is_plain_model_dir)
    gguf = gguf_file.is_gguf(hf_dir)
    if gguf:
        params, config = gguf_file.read_gguf(hf_dir, dtype, progress=progress)
    else:
        params, config = read_hf_checkpoint(hf_dir, dtype, allow_pickle, progress)
    check_params(params, config)
    with atomic_dir(dest) as tmp:
        config.to_json_file(tmp / CONFIG_FILE)
        copy_tokenizer_files(hf_dir if gguf else find_tokenizer_files(hf_dir), tmp)
        save_params(tmp / "params", params)
    return Path(out_dir)


def orbax_to_hf(ckpt: str | Path, out_dir: str | Path, exit_layer: int | None = None,
                step: int | None = None, dtype: Any = None, shard_size: str | int = "2GB",
                overwrite: bool = False, progress: bool = True) -> Path:
    """Model dir or training workdir -> HF dir (depth `exit_layer` sub-model if given).

    The params are read and handed straight to `hf_export`, which is then their only holder
    and frees them array by array: the model is held once, not twice."""
    out = destinations.claim_dir(out_dir, flag="--out", command=ORBAX_TO_HF, inputs=[ckpt],
                                 overwrite=overwrite)
    parse_size(shard_size)
    resolve_dtype(dtype)
    art = artifacts.inspect(ckpt)
    if exit_layer is not None:
        hf_export.check_exit_layer(exit_layer, art.config)  # before reading any weights
    views, sub_config = hf_export.submodel_tensors(art.load_params(step), art.config,
                                                   exit_layer)
    return hf_export.write_export(out, views, sub_config, dtype, shard_size, art.tokenizer_dir,
                                  overwrite, progress)


def orbax_to_peft(ckpt: str | Path, out_dir: str | Path, step: int | None = None,
                  dtype: Any = None, overwrite: bool = False) -> Path:
    """A LoRA run's adapters -> an HF PEFT adapter dir for the base it was trained on."""
    out = destinations.claim_dir(out_dir, flag="--out", command=ORBAX_TO_HF, inputs=[ckpt],
                                 overwrite=overwrite)
    trained, record, _ = peft_export.lora_record(
        model_io.require_filesystem_path(ckpt, "--ckpt"), step)
    return peft_export.write_peft(out, trained, record, resolve_dtype(dtype))
