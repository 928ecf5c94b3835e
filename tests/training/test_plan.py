"""Memory planner: analytic state bytes vs XLA's compiled figures; a 7B plan on 8 devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PLAN_2L, TINY_PRESET_BYTE

from sorted_jax.model import modeling
from sorted_jax.model.config import preset
from sorted_jax.parallel import sharding
from sorted_jax.tools import memory_planner as plan
from sorted_jax.training import train_step


def build(cfg, mesh_shape, exits, remat="none"):
    n = int(np.prod([s for s in mesh_shape if s > 0])) if -1 not in mesh_shape else 8
    if len(jax.devices()) < n:
        pytest.skip("needs 8 (fake) devices")
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:n])
    tx, _ = train_step.make_optimizer(lr=1e-4, total_steps=100)
    model = modeling.make_model(cfg, dtype=jnp.bfloat16, remat_policy=remat)
    return train_step.SoftSteps(model, exits=exits, tx=tx, mesh=mesh)


def test_state_figures_match_xla_within_10_percent():
    cfg = TINY_PRESET_BYTE
    steps = build(cfg, (2, 2, 2), (2, 4, 6, 8))
    b, t = 8, 64
    p = plan.plan_steps(steps, (b, t), device_memory_gib=16)
    # Independent figure: XLA's own argument bytes minus this device's batch rows.
    batch_bytes = 4 * (b // 4) * t * 4  # 4 int32/float32 [B/dp, T] arrays; dp = data*fsdp = 4
    xla_state = p.compiled_argument_bytes - batch_bytes
    ours = p.params_bytes + p.opt_state_bytes
    assert abs(ours - xla_state) <= 0.10 * xla_state, (ours, xla_state)
    # Adam keeps two fp32 moments per fp32 param.
    assert p.opt_state_bytes == pytest.approx(2 * p.params_bytes, rel=0.01)
    # Sharding over fsdp x tensor = 4 ways cuts the params per device about 4x.
    full = cfg.num_params() * 4
    assert p.params_bytes < 0.4 * full
    assert p.compiled_temp_bytes > 0 and p.fits


def test_not_fitting_gives_suggestions():
    cfg = TINY_PRESET_BYTE
    steps = build(cfg, (8, 1, 1), (8,))
    p = plan.plan_steps(steps, (8, 64), device_memory_gib=1e-4)
    assert p.fits is False and "does NOT fit" in p.table()
    tips = plan.suggestions(p, "none", "")
    assert any("mesh.shape=1,-1,1" in s for s in tips)
    assert any("remat_policy=full" in s for s in tips)
    assert any("optim.mu_dtype=bfloat16" in s for s in tips)
    # No advice to make params bf16: with their fp32 master copy they cost more, not less.
    assert not any("param_dtype" in s for s in tips)
    assert not any("mu_dtype" in s for s in plan.suggestions(p, "none", "bfloat16"))


def test_soft_7b_plan_on_an_8_device_fsdp_mesh():
    """LLaMA-2-7B, the paper's 6 exits, batch 32 x 512, fsdp over 8 devices (8xH100 / v5p-8)."""
    cfg = preset("llama2-7b")
    steps = build(cfg, (1, 8, 1), (12, 16, 20, 24, 28, 32), remat="full")
    p = plan.plan_steps(steps, (32, 512), device_memory_gib=plan.DEVICE_MEMORY_GIB["h100"])
    params_per_device = cfg.num_params() * 4 / 8
    assert p.params_bytes == pytest.approx(params_per_device, rel=0.01)
    assert 0 < p.compiled_temp_bytes < 80 * plan.GiB
    assert p.fits
    assert "total / device" in p.table()


def test_bf16_params_are_planned_with_their_fp32_master_copy():
    """bf16 params halve the params, but training keeps an fp32 master copy in the optimizer
    state (they would not learn at lr 2e-5 otherwise): the plan counts it, so bf16 params never
    look cheaper than fp32 ones."""
    cfg = PLAN_2L
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    tx, _ = train_step.make_optimizer(lr=1e-4, total_steps=10, mu_dtype=jnp.bfloat16)
    fp32 = train_step.SoftSteps(modeling.make_model(cfg), exits=(2,), tx=tx, mesh=mesh)
    bf16 = train_step.SoftSteps(modeling.make_model(cfg, param_dtype=jnp.bfloat16), exits=(2,),
                                tx=tx, mesh=mesh)
    a = plan._sharded_bytes(fp32.abstract_state.params, fp32.state_shardings.params)
    b = plan._sharded_bytes(bf16.abstract_state.params, bf16.state_shardings.params)
    assert b == pytest.approx(a / 2)
    opt_a = plan._sharded_bytes(fp32.abstract_state.opt_state, fp32.state_shardings.opt_state)
    opt_b = plan._sharded_bytes(bf16.abstract_state.opt_state, bf16.state_shardings.opt_state)
    assert opt_b == pytest.approx(opt_a + a, rel=0.01)  # + the fp32 master
    assert b + opt_b > a + opt_a


def test_train_cli_plan_for_more_devices_than_this_process_has():
    """`--plan --plan_devices=N` plans in a child with N fake devices; allocates no model."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "sorted_jax.train", "--config=configs/tiny.py", "--plan",
         "--plan_devices=2", "--plan_device_memory=0.0001", "--config.mesh.shape=1,-1,1"],
        capture_output=True, text=True, timeout=600,
        cwd=__import__("pathlib").Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fsdp=2" in out.stdout and "2 device(s)" in out.stdout
    assert "does NOT fit" in out.stdout and "remat_policy=full" in out.stdout


def test_anchored_and_adapter_plans_count_the_teacher_and_only_the_adapters_state():
    """The teacher is a step argument (in XLA's argument bytes, its own row in the table); a
    frozen trunk has no optimizer state: Adam's two moments cover the adapters only."""
    cfg = preset("tiny").replace(vocab_size=264)
    exits = (2, 4, 6, 8)
    mesh = sharding.make_mesh((2, 2, 2), jax.devices()[:8]) if len(jax.devices()) >= 8 else None
    if mesh is None:
        pytest.skip("needs 8 (fake) devices")
    tx, _ = train_step.make_optimizer(lr=1e-4, total_steps=100)

    def steps(config, **kw):
        return train_step.SoftSteps(modeling.make_model(config, dtype=jnp.bfloat16), exits=exits,
                                    tx=tx, mesh=mesh, **kw)

    base = plan.plan_steps(steps(cfg), (8, 64))
    teacher = modeling.make_model(cfg, dtype=jnp.bfloat16)
    anchored = plan.plan_steps(steps(cfg, teacher=teacher, anchor_weights=[0, 0, 0, 1.0]),
                               (8, 64))
    assert anchored.teacher_bytes == pytest.approx(base.params_bytes, rel=1e-6)
    assert "frozen teacher / device" in anchored.table()
    grown = anchored.compiled_argument_bytes - base.compiled_argument_bytes
    assert grown == pytest.approx(anchored.teacher_bytes, rel=0.10)

    adapted_cfg = cfg.replace(exit_adapters=(2, 4, 6))
    adapters = plan.plan_steps(steps(adapted_cfg, trainable_keys=("exit_adapters",)), (8, 64))
    layer = (cfg.num_params() - cfg.vocab_size * cfg.hidden_size * 2 - cfg.hidden_size) / 8
    expected_opt = 2 * 4 * 3 * layer / 4  # 2 fp32 moments of 3 adapter layers, over fsdp x tp
    assert adapters.opt_state_bytes == pytest.approx(expected_opt, rel=0.05)
    assert adapters.opt_state_bytes < 0.5 * base.opt_state_bytes


@pytest.mark.parametrize("config_file,device_gib,base_bits", [
    ("soft_7b_lora.py", 24, 16), ("soft_7b_qlora.py", 16, 4.5)])
def test_7b_lora_plans_fit_one_gpu(config_file, device_gib, base_bits):
    """LLaMA-2-7B, r=16 on all seven projections, 6 exits, micro-batch 4 x 2048, full remat,
    one device: the frozen base is counted at its storage width (bf16, or NF4's 4.5 bits), the
    optimizer holds the adapters' moments only, and the step fits the issue's goals (a 24 GiB
    device for a bf16 base, 16 GiB for a 4-bit one) once XLA:CPU's attention scores and bf16
    upcasts are set apart (the table shows them)."""
    from helpers import REPO

    from sorted_jax.training import run_spec

    config, _ = run_spec.parse_args(["train", f"--config={REPO / 'configs' / config_file}",
                                     "--workdir=unused"])
    assert (config.lora.rank, config.batch_size // config.grad_accum, config.max_len) == (
        16, 4, 2048)
    assert config.exits == "12,16,20,24,28,32" and tuple(config.mesh.shape) == (1, 1, 1)
    # In a child with one (CPU) device, as `--plan` runs for a one-device config.
    p = plan.plan_in_subprocess([f"--config={REPO / 'configs' / config_file}", "--plan",
                                 "--plan_json", "--plan_devices=1",
                                 f"--plan_device_memory={device_gib}"], 1, timeout=900)
    mc = preset("llama2-7b")
    layer_weights = mc.num_hidden_layers * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    rest = 2 * mc.vocab_size * 4096 + (2 * mc.num_hidden_layers + 1) * 4096  # bf16
    assert p["frozen_bytes"] == pytest.approx(layer_weights * base_bits / 8 + 2 * rest,
                                              rel=0.01)
    adapters = mc.num_hidden_layers * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert p["params_bytes"] == pytest.approx(4 * adapters, rel=0.01)  # fp32 adapters
    assert p["opt_state_bytes"] == pytest.approx(2 * p["params_bytes"], rel=0.01)  # no base
    # XLA:CPU's attention scores and bf16 upcasts set apart, and shown
    assert p["cpu_temp_bytes"] > p["compiled_temp_bytes"] + p["cpu_upcast_bytes"]
    assert p["devices"] == 1 and p["fits"], p["table"]
    assert "frozen base / device" in p["table"] and "XLA:CPU" in p["table"]
