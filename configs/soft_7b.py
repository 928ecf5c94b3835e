"""SoFT of LLaMA-2 7B on Stanford Alpaca, the paper's recipe (arXiv 2309.08968, Sec. 4).

    python -m sorted_jax.convert hf-to-orbax ... --out=/models/llama2-7b   # base weights
    python -m sorted_jax.train --config=configs/soft_7b.py --workdir=/ckpt/soft_7b \\
        --config.init_from=/models/llama2-7b [--config.data.train=/data/alpaca_data.json]

Exits 12,16,...,32 (every 4th layer from 12), lr 2e-5 cosine with 3% warmup, 2 epochs,
effective batch 32 (4 micro-batches of 8), bf16 compute on fp32 master weights, FSDP over all
devices, remat of the scanned layers.
"""

from sorted_jax.train_config import alpaca_config


def get_config():
    c = alpaca_config(preset="llama2-7b", exits="12,16,20,24,28,32")
    # The recipe, chosen on the pretrained-then-SoFT demo (README, "Choosing a recipe"): the
    # paper's uniform mean gave the best sub-models with the last exit no worse than SFT's.
    # If the last exit pays on your model, try exit_weights="last" first.
    c.exit_weights = "uniform"
    return c
