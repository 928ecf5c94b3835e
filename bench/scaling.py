"""Per-device cost of the SoFT train step as the device count grows (abstract: nothing allocated).

    python bench/scaling.py                       # TinyLlama-1.1B and LLaMA-2-7B, 1/2/4/8 devices
    python bench/scaling.py --models 1b --devices 1,2,4,8 --meshes data,fsdp

For each model and mesh the real train step (`SoftSteps`, the configs' exits, bf16 compute, fp32
master weights) is compiled for N fake CPU devices on abstract inputs, and the per-device
program is read: XLA's compiled temporaries and arguments (`memory_analysis`), and the dot FLOPs
of the program with every loop counted trip-count times (`sorted_jax.tools.hlo_stats`; XLA's own
`cost_analysis` counts a loop body once). Ideal scaling is 1/N of the 1-device figure: the table
prints each figure and its ratio to that ideal. On a `data` mesh the fp32 gradients (and the
replicated params / Adam state) are per-device copies by design, so only activations and loss
scale there; on `fsdp` everything is sharded.

CPU compilation stands in for the accelerator's: fusion decisions differ, so memory is a plan,
but the FLOP count (the dots the program runs) is what each device executes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = {
    # name: (preset, exits, global batch, seq, remat)
    "1b": ("tinyllama-1.1b", (8, 10, 12, 14, 16, 18, 20, 22), 8, 2048, "none"),
    "7b": ("llama2-7b", (12, 16, 20, 24, 28, 32), 32, 512, "dots_with_no_batch_dims_saveable"),
}
MESHES = {"data": lambda n: (n, 1, 1), "fsdp": lambda n: (1, n, 1)}


def measure(model: str, mesh_kind: str, devices: int, rows_per_chunk: int) -> dict:
    """Compile one step in this process (which must have >= `devices` CPU devices)."""
    import jax
    import jax.numpy as jnp

    from sorted_jax.model import modeling
    from sorted_jax.model.config import preset
    from sorted_jax.parallel import sharding
    from sorted_jax.tools import hlo_stats
    from sorted_jax.training import train_step

    name, exits, batch, seq, remat = MODELS[model]
    cfg = preset(name)
    mesh = sharding.make_mesh(MESHES[mesh_kind](devices), jax.devices()[:devices])
    tx, _ = train_step.make_optimizer(lr=2e-5, total_steps=1000)
    steps = train_step.SoftSteps(
        modeling.make_model(cfg, dtype=jnp.bfloat16, remat_policy=remat), exits=exits, tx=tx,
        mesh=mesh, rows_per_chunk=rows_per_chunk)
    t0 = time.perf_counter()
    compiled = steps.lower_train_step((batch, seq)).compile()
    mem = compiled.memory_analysis()
    stats = hlo_stats.analyse(compiled.as_text())
    return {"model": model, "mesh": mesh_kind, "devices": devices,
            "temp_GiB": mem.temp_size_in_bytes / 2**30,
            "args_GiB": mem.argument_size_in_bytes / 2**30,
            "dot_TFLOP": stats.dot_flops / 1e12,
            "compile_s": round(time.perf_counter() - t0, 1)}


def child(argv: list[str], devices: int) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        os.environ.get("XLA_FLAGS", "") +
        f" --xla_force_host_platform_device_count={devices}").strip())
    out = subprocess.run([sys.executable, __file__, "--child", *argv], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def table(rows: list[dict]) -> str:
    """Markdown: each figure and its ratio to ideal 1/N scaling of the 1-device figure."""
    base = {r["model"]: r for r in rows if r["devices"] == 1}
    lines = ["| model | mesh | devices | dot TFLOP / device | x ideal | temporaries GiB / "
             "device | x ideal | arguments GiB / device |", "|---|---|---:|---:|---:|---:|---:|"
             "---:|"]
    for r in rows:
        b, n = base[r["model"]], r["devices"]
        lines.append(
            f"| {r['model']} | {r['mesh'] if n > 1 else '-'} | {n} | {r['dot_TFLOP']:.2f} | "
            f"{r['dot_TFLOP'] / (b['dot_TFLOP'] / n):.3f} | {r['temp_GiB']:.2f} | "
            f"{r['temp_GiB'] / (b['temp_GiB'] / n):.2f} | {r['args_GiB']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="1b,7b")
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--meshes", default="data,fsdp")
    ap.add_argument("--rows-per-chunk", type=int, default=4096)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    counts = sorted(int(n) for n in args.devices.split(",") if n)
    meshes = [m for m in args.meshes.split(",") if m]
    if args.child:
        for m in models:
            for kind in meshes:
                for n in counts:
                    print(json.dumps(measure(m, kind, n, args.rows_per_chunk)), flush=True)
        return
    rows = []
    for m in models:
        rows += child(["--models", m, "--devices", "1", "--meshes", meshes[0],
                       "--rows-per-chunk", str(args.rows_per_chunk)], 1)
        for kind in meshes:
            for n in (c for c in counts if c > 1):
                rows += child(["--models", m, "--devices", str(n), "--meshes", kind,
                               "--rows-per-chunk", str(args.rows_per_chunk)], n)
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
