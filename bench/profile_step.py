"""Where the compiled CPU train step's time goes: the jax profiler over two steps, ops grouped
by kind (per step, summed over threads), the largest ops with their HLO shape.

    python bench/profile_step.py                       # cpu-bench, SFT, attention auto
    python bench/profile_step.py --exits 2,4,6,8 --attention xla

Same model and batch as `bench/train_step.py --size cpu-bench --dtype float32` (4 x 512, fp32).
The breakdown in docs/benchmarks.md (XLA vs blockwise attention) came from this script.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.lib import _profile_data

from sorted_jax.model import modeling
from sorted_jax.model.config import LlamaConfig
from sorted_jax.parallel import sharding
from sorted_jax.training import train_step

WRAPPERS = ("ThunkExecutor", "Slinky", "$")  # executor / thread-pool / Python events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", default="8")
    ap.add_argument("--attention", default="auto", choices=modeling.ATTENTION_IMPLEMENTATIONS)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    cfg = LlamaConfig(max_position_embeddings=4096, hidden_size=256, intermediate_size=688,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      vocab_size=32000)
    model = modeling.make_model(cfg, dtype=jnp.float32, attention_impl=args.attention)
    tx, _ = train_step.make_optimizer(lr=1e-5, total_steps=1000, clip_norm=None)
    steps = train_step.SoftSteps(model, exits=[int(e) for e in args.exits.split(",")], tx=tx,
                                 mesh=sharding.make_mesh((-1, 1, 1)))
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 512)).astype(np.int32)
    batch = train_step.to_global_batch(
        {"input_ids": ids, "targets": np.roll(ids, -1, 1),
         "loss_mask": np.ones(ids.shape, np.float32),
         "attention_mask": np.ones(ids.shape, np.int32)}, steps.batch_shardings)
    state = steps.init_state(jax.random.PRNGKey(0))
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        state, m = steps.train_step(state, batch)
        jax.block_until_ready(m["loss"])
        if i >= 2:
            times.append(time.perf_counter() - t0)
    print(f"step {statistics.median(times):.3f} s (median of 3, attention "
          f"{modeling.resolve_attention_impl(args.attention, jnp.float32)})")
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(2):
                state, m = steps.train_step(state, batch)
                jax.block_until_ready(m["loss"])
        data = _profile_data.ProfileData.from_file(
            glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
        per_op, per_kind = collections.Counter(), collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                if line.name == "python" or "PjRt" in line.name:
                    continue
                for ev in line.events:
                    if not ev.name.startswith(WRAPPERS):
                        per_op[ev.name] += ev.duration_ns / 2
                        per_kind[re.sub(r"\.\d+$", "", ev.name)] += ev.duration_ns / 2
    print("\nms per step by op kind")
    for k, v in per_kind.most_common(args.top):
        print(f"{v / 1e6:9.1f}  {k}")
    hlo = steps.lower_train_step(ids.shape).compile().as_text()
    print("\nlargest ops")
    for k, v in per_op.most_common(args.top):
        shape = re.search(rf"%{re.escape(k)} = (\S+) ", hlo)
        print(f"{v / 1e6:9.1f}  {k:32s} {shape.group(1) if shape else ''}")


if __name__ == "__main__":
    main()
