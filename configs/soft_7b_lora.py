"""SoFT of LLaMA-2 7B on one 24 GiB GPU: LoRA adapters on a frozen bf16 base (docs/lora.md).

    python -m sorted_jax.convert hf-to-orbax ... --out=/models/llama2-7b   # or an HF dir as is
    python -m sorted_jax.train --config=configs/soft_7b_lora.py --workdir=/ckpt/soft_7b_lora \\
        --config.init_from=/models/llama2-7b [--plan]

The paper's task and exits (Stanford Alpaca, exits 12,16,...,32, exit weights `last`, 2 epochs,
effective batch 32) with rank-16 adapters (alpha 32) on every projection of every layer over the
base frozen in bfloat16: no gradient, optimizer state or fp32 master copy for its weights, and
checkpoints of the adapters only. Micro-batches of 4 rows of up to 2048 tokens (x 8
accumulated), full remat; `--plan` gives the per-device memory. Every command reads the workdir
with the adapters merged in; `convert orbax-to-hf --peft` writes them as an HF PEFT adapter.
"""

from sorted_jax.training.train_config import one_gpu_lora_config


def get_config():
    return one_gpu_lora_config("llama2-7b", exits="12,16,20,24,28,32", base_dtype="bfloat16")
