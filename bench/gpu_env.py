"""Step 1 of bench/gpu_suite.sh: what the figures were measured on, and a bf16 matmul ceiling.

    python bench/gpu_env.py                 # on the GPU: 8192^3 bf16
    python bench/gpu_env.py --n 256         # the suite's CPU dry run

Prints one JSON line: library versions (read from package metadata, so torch is not imported),
the device JAX sees, and the TFLOP/s of a jitted `a @ b` (bf16 inputs, bf16 out). The matmul
rate is the ceiling the train step's model TFLOP/s is compared with: model FLOPs / step time
over this is the MFU that means something on this very machine (the datasheet's dense bf16 peak
is not reached by any real kernel; 645 TFLOP/s was measured with JAX on an H200 before).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "ml-collections",
            "tensorboardX", "transformers", "torch", "numpy")


def versions() -> dict[str, str | None]:
    """Installed versions, plus any JAX CUDA/ROCm plugin (jax-cuda13-plugin, ...)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    for dist in md.distributions():
        name = dist.metadata["Name"] or ""
        if name.startswith(("jax-cuda", "jax_cuda", "jax-rocm")):
            out[name] = dist.version
    return out


def cuda_info() -> dict:
    """CUDA runtime/cuDNN versions from jaxlib (None without a CUDA plugin) and nvidia-smi."""
    info: dict = {}
    try:
        from jax._src.lib import cuda_versions  # private, but the only place jaxlib says it

        if cuda_versions is not None:
            info["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
            info["cudnn"] = cuda_versions.cudnn_get_version()
    except Exception as e:  # any failure here only loses a detail
        info["cuda_versions_error"] = repr(e)[:200]
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()[:200]
    return info


def matmul_tflops(n: int, rounds: int, reps: int) -> dict:
    """2 n^3 FLOPs per product; `reps` products queued back to back, best and median round."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(jnp.matmul)
    for _ in range(3):
        f(a, b).block_until_ready()
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = f(a, b)
        out.block_until_ready()
        rates.append(2 * n**3 * reps / (time.perf_counter() - t0) / 1e12)
    return {"matmul_n": n, "matmul_dtype": "bfloat16", "matmul_tflops": float(f"{max(rates):.4g}"),
            "matmul_tflops_median": float(f"{statistics.median(rates):.4g}")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192, help="matmul size (n x n times n x n)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)

    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    row = {"figure": "environment", "python": platform.python_version(),
           "versions": versions(), "backend": jax.default_backend(),
           "device_count": jax.device_count(), "device_kind": dev.device_kind,
           "platform_version": str(getattr(dev.client, "platform_version", "")),
           "device_memory_GiB": (round(stats["bytes_limit"] / 2**30, 2)
                                 if "bytes_limit" in stats else None),
           **cuda_info()}
    print(json.dumps(row), flush=True)  # the environment survives a matmul that fails
    print(json.dumps({"figure": "matmul", **matmul_tflops(args.n, args.rounds, args.reps)}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
