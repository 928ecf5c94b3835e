"""SoFT of LLaMA-2 7B on one 16 GiB GPU: QLoRA, the adapters on a frozen NF4 base (docs/lora.md).

    python -m sorted_jax.train --config=configs/soft_7b_qlora.py --workdir=/ckpt/soft_7b_qlora \\
        --config.init_from=/models/llama2-7b [--plan]

`configs/soft_7b_lora.py` with the base's layer weights held in 4-bit NormalFloat (QLoRA's NF4,
blocks of 64 with an fp32 absmax: 4.5 bits per weight; embeddings, norms and head in bfloat16),
dequantised one layer at a time inside the scan. Every command reads the workdir as the
dequantised base plus the adapters: the model this run trained.
"""

from sorted_jax.training.train_config import one_gpu_lora_config


def get_config():
    return one_gpu_lora_config("llama2-7b", exits="12,16,20,24,28,32", base_dtype="nf4")
