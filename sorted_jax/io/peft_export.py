"""A LoRA run's adapters as an HF PEFT adapter dir, for the base HF model the run started from.

    OUT/adapter_config.json         PEFT's LoraConfig: r, lora_alpha, target_modules, ...
    OUT/adapter_model.safetensors   base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.
                                    lora_A.weight [r, in] and lora_B.weight [out, r]

PEFT scales the update by lora_alpha / r, as the run did (`lora.LoraSpec.scaling`), so
`PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(BASE), OUT)` is the trained model.
Our A `[*in, r]` and B `[r, *out]` flatten to HF's `in` / `out` orders (the ones
`hf_mapping` uses for the kernels), transposed. A run with a quantised base trained its adapters
against the dequantised base: on the original bf16 / fp32 base they give a slightly different
model (the merged export, `convert orbax-to-hf` without `--peft`, is exactly the trained one).
Trained norms (`lora.train_norms`) have no place in a LoRA adapter: such a run is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from sorted_jax.core.errors import ConversionError
from sorted_jax.io import model_io
from sorted_jax.io.destinations import Destination, atomic_dir
from sorted_jax.io.lora_merge import BaseRecord
from sorted_jax.model import lora

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def lora_record(path: Path, step: int | None) -> tuple[dict, BaseRecord, int]:
    """(the adapters as saved, their base record, the step) of a LoRA workdir; anything else
    is refused before a weight is read."""
    if model_io.model_kind(path) != model_io.WORKDIR:
        raise ConversionError(f"--peft exports a LoRA training run's adapters: {path} is a "
                              f"{model_io.model_kind(path)}, not a training workdir")
    steps = model_io.workdir_steps(path)
    if not steps:
        raise ConversionError(f"--peft: {path} holds no finished checkpoint step")
    s = steps[-1] if step is None else step
    if s not in steps:
        raise ConversionError(f"--peft: step {s} is not in {path}; available steps: {steps}")
    where = f"step {s} of {path}"
    record = BaseRecord.from_meta(model_io.read_workdir_meta(path, s), where)
    if record is None:
        raise ConversionError(f"--peft: {path} is a full fine-tuning run (lora.rank=0), not a "
                              "LoRA run: it has no adapters; export the model without --peft")
    if record.spec.train_norms:
        raise ConversionError(f"--peft: {path} also trained its norms (lora.train_norms), which "
                              "a PEFT LoRA adapter cannot hold; export the merged model without "
                              "--peft")
    trained, _, s = model_io.load_workdir_params(path, s, merge_lora=False)
    return trained, record, s


def peft_tensors(trained: dict, record: BaseRecord, dtype: Any = None) -> dict[str, np.ndarray]:
    """PEFT's names -> contiguous arrays, one per layer and adapted projection."""
    out = {}
    for target in record.spec.targets:
        parent, name = lora.MODULES[target]
        node = trained["layers"][parent][name]
        a, b = np.asarray(node[lora.LORA_A]), np.asarray(node[lora.LORA_B])
        r = a.shape[-1]
        for i in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.{parent}.{name}"
            out[f"{prefix}.lora_A.weight"] = a[i].reshape(-1, r).T
            out[f"{prefix}.lora_B.weight"] = b[i].reshape(r, -1).T
    return {k: np.ascontiguousarray(v, dtype=dtype or v.dtype) for k, v in sorted(out.items())}


def adapter_config(record: BaseRecord) -> dict[str, Any]:
    spec = record.spec
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path":
        record.init_from, "r": spec.rank, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "target_modules": sorted(
            lora.MODULES[t][1] for t in spec.targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }


def write_peft(out: Destination, trained: dict, record: BaseRecord, dtype: Any = None) -> Path:
    """The adapter dir, written atomically into the claimed `out`."""
    tensors = peft_tensors(trained, record, dtype)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config(record), indent=2) + "\n")
    return out.path
