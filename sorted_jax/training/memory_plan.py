"""`python -m sorted_jax.train --config=... --plan`: will this config's train step fit?

    python -m sorted_jax.train --config=configs/soft_7b.py --plan --plan_devices=8 \\
        --plan_device_memory=h100

Prints, without allocating the model, the per-device bytes of params, optimizer state, the
step's arguments and its compiled temporaries for the configured mesh
(`sorted_jax.tools.memory_planner`), and which change helps if it does not fit.
`--plan_devices=N` plans for N devices in a child process with N fake CPU devices;
`--plan_json` prints the plan as JSON (what that child does).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sorted_jax.core.errors import TrainConfigError
from sorted_jax.io import model_io
from sorted_jax.model import modeling
from sorted_jax.model.modeling import DTYPES, EXIT_ADAPTERS
from sorted_jax.objective import soft
from sorted_jax.parallel import sharding
from sorted_jax.tools import memory_planner as planner
from sorted_jax.training import frozen, lora_run, run_spec
from sorted_jax.training.train_step import SoftSteps, make_optimizer


def plan_memory(c: ml_collections.ConfigDict, device_memory: str | None = None) -> Any:
    """`--plan`: per-device memory of this config's train step, without allocating the model."""
    run_spec.check_static(c)
    mc = run_spec.requested_model_config(c)
    if mc is None:
        if not c.init_from:
            raise TrainConfigError("--plan needs model.preset or init_from for the model shape")
        mc = model_io.load_config(c.init_from)
    exits = soft.resolve_exits(c.exits, mc.num_hidden_layers)
    if c.exit_adapters != "none":
        mc = mc.replace(exit_adapters=tuple(e for e in exits if e < mc.num_hidden_layers))
    mesh = sharding.make_mesh(tuple(c.mesh.shape))
    rules = sharding.rules_from_config(c.mesh.rules)
    sharding.check_batch_size(c.batch_size, mesh, rules, c.grad_accum)
    spec = lora_run.lora_spec(c)
    lora_run.check_model(spec, mc)

    # Planned on a CPU for a GPU run: also compiled without XLA:CPU's attention scores and bf16
    # upcasts (`memory_planner`'s docstring). Both compiles then take XLA's reference attention
    # (what `auto` ran on CPU before it took the blockwise one), whose scores the estimate's
    # flash stand-in replaces.
    half = jnp.dtype(DTYPES[c.dtype]).itemsize < 4
    gpu = jax.default_backend() == "cpu" and half and c.attention_impl in ("auto", "cudnn")

    def build(spec: Any) -> SoftSteps:
        model = modeling.make_model(mc, dtype=DTYPES[c.dtype],
                                    param_dtype=lora_run.base_param_dtype(c, spec),
                                    attention_impl="xla" if gpu else c.attention_impl,
                                    remat_policy=c.remat_policy, lora=spec)
        tx, _ = make_optimizer(lr=c.optim.lr, total_steps=1000,
                               mu_dtype=run_spec.mu_dtype_of(c),
                               clip_norm=c.optim.clip_norm or None)
        return SoftSteps(model, exits, tx, mesh, rules, grad_accum=c.grad_accum,
                         rows_per_chunk=c.loss_rows_per_chunk,
                         trainable_keys=(EXIT_ADAPTERS,) if c.exit_adapters != "none" else None,
                         teacher=frozen.teacher_model(c, mc),
                         anchor_weights=frozen.anchor_weights(c, tuple(exits)))

    steps = build(spec)
    float_base = spec is not None and not spec.quantised
    estimate = build(dataclasses.replace(spec, base_dtype="int8") if float_base else spec) \
        if gpu else None
    gib = None
    if device_memory:
        key = device_memory.lower()
        try:
            gib = planner.DEVICE_MEMORY_GIB[key] if key in planner.DEVICE_MEMORY_GIB else float(
                key)
        except ValueError:
            raise TrainConfigError(
                f"--plan_device_memory={device_memory!r}: give GiB or one of "
                f"{', '.join(planner.DEVICE_MEMORY_GIB)}") from None
    return planner.plan_steps(steps, (c.batch_size, c.max_len), gib, estimate), mc, exits


def pop_plan_flags(argv: list[str]) -> tuple[list[str], dict[str, Any] | None]:
    """Strip `--plan`, `--plan_devices=N`, `--plan_device_memory=X`, `--plan_json` from argv."""
    opts: dict[str, Any] = {}
    rest = []
    for a in argv:
        name, _, value = a.partition("=")
        if name in ("--plan", "--plan_json"):
            opts[name[2:]] = True
        elif name in ("--plan_devices", "--plan_device_memory"):
            opts[name[2:]] = value
        else:
            rest.append(a)
    if not opts:
        return rest, None
    if not any(a.startswith("--workdir") for a in rest):
        rest.append("--workdir=unused-by-plan")
    return rest, opts


def run_plan(config: ml_collections.ConfigDict, argv: list[str], opts: dict[str, Any]) -> int:
    want = int(opts.get("plan_devices") or 0)
    if want and want != jax.device_count():
        # Plan for N devices on this host: a child process with N fake CPU devices.
        child = [a for a in argv[1:] if not a.startswith("--plan_devices")]
        child += ["--plan_json", f"--plan_devices={want}"]
        if opts.get("plan_device_memory"):
            child.append(f"--plan_device_memory={opts['plan_device_memory']}")
        result = planner.plan_in_subprocess(child, want)
        print(result["table"])
        for tip in result["suggestions"]:
            print(f"  - {tip}")
        return 0
    p, mc, exits = plan_memory(config, opts.get("plan_device_memory"))
    tips = planner.suggestions(p, config.remat_policy, config.optim.mu_dtype)
    spec = lora_run.lora_spec(config)
    lora_text = "" if spec is None else (
        f"LoRA rank {spec.rank} on {','.join(spec.targets)} over a frozen {spec.base_dtype} "
        "base, ")
    header = (f"plan: {mc.num_params() / 1e9:.2f}B params, {lora_text}exits {list(exits)}, batch "
              f"{config.batch_size} x {config.max_len} (grad_accum {config.grad_accum}), remat "
              f"{config.remat_policy}, {config.dtype} compute / {config.param_dtype} params, "
              f"{p.devices} device(s)")
    table = header + "\n" + p.table()
    if opts.get("plan_json"):
        print(json.dumps({**p.to_json(), "table": table, "suggestions": tips}))
    else:
        print(table)
        for tip in tips:
            print(f"  - {tip}")
    return 0
