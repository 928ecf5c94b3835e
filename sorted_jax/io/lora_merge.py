"""A LoRA run's weights as every command reads them: its base with the adapters merged in.

A LoRA run's checkpoints hold only what it trained (`lora_a` / `lora_b` per adapted projection,
the norms with `train_norms`), and in each step's `meta` item the record of the base they fit:

    meta["lora"] = {"init_from": "/abs/path/of/the/base", "base_fingerprint": "…",
                    "spec": {"rank": 16, "alpha": 32.0, "targets": [...], "base_dtype": …}}

`model_io.load_workdir_params` reads the adapters, loads that base (any model source, itself a
workdir included), checks its fingerprint (`lora.fingerprint`) and merges once
(`lora.merge`: `W + alpha / r * A @ B`, over the dequantised W when the base was quantised, so
the merged model is the one the run trained and evaluated). `generate`, `serve`, `evaluate`,
`ict` and `convert` then see a plain LLaMA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from sorted_jax.core.errors import ModelIOError
from sorted_jax.model import lora
from sorted_jax.model.lora import LoraSpec

META_KEY = "lora"


@dataclasses.dataclass(frozen=True)
class BaseRecord:
    """What a LoRA checkpoint records about its base."""

    init_from: str
    fingerprint: str
    spec: LoraSpec

    def to_meta(self) -> dict[str, Any]:
        """The entry of a checkpoint's meta: {META_KEY: {...}}."""
        return {META_KEY: {"init_from": self.init_from, "base_fingerprint": self.fingerprint,
                           "spec": self.spec.to_dict()}}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], where: str) -> BaseRecord | None:
        """The record in a checkpoint's meta (None: not a LoRA checkpoint)."""
        rec = meta.get(META_KEY)
        if not rec:
            return None
        try:
            return cls(str(rec["init_from"]), str(rec["base_fingerprint"]),
                       LoraSpec.from_dict(rec["spec"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelIOError(f"{where}: the LoRA record in its meta is unreadable ({e})") from e


def check_base(record: BaseRecord, base: Mapping[str, Any], where: str) -> None:
    """The base loaded from `record.init_from` is still the one the adapters were trained on."""
    now = lora.fingerprint(base)
    if now != record.fingerprint:
        raise ModelIOError(
            f"{where} holds LoRA adapters trained on the base {record.init_from} (fingerprint "
            f"{record.fingerprint}), but that path now holds other weights (fingerprint {now}); "
            "adapters only fit the weights they were trained on: put that base back")


def merged(base: Mapping[str, Any], trained: Mapping[str, Any], record: BaseRecord,
           where: str, dtype: Any = None, shardings: Any = None) -> dict:
    """The plain params of a LoRA run (numpy, or placed in `shardings`)."""
    check_base(record, base, where)
    base = {k: v for k, v in base.items() if k != "exit_adapters"}
    params = lora.merge(base, trained, record.spec, dtype)
    return params if shardings is None else jax.device_put(params, shardings)


def require_base_path(record: BaseRecord, where: str) -> Path:
    p = Path(record.init_from)
    if not p.exists():
        raise ModelIOError(f"{where} holds LoRA adapters for the base {p}, which does not exist "
                           "any more: the merged model needs it (restore it at that path)")
    return p
