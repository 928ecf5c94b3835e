"""SoFT of LLaMA-2 13B (40 layers) on Stanford Alpaca, exits 12,16,...,40 as in the paper.

    python -m sorted_jax.train --config=configs/soft_13b.py --workdir=/ckpt/soft_13b \\
        --config.init_from=/models/llama2-13b
"""

from sorted_jax.train_config import alpaca_config


def get_config():
    c = alpaca_config(preset="llama2-13b", exits="12,16,20,24,28,32,36,40")
    # The recipe, chosen on the pretrained-then-SoFT demo (README, "Choosing a recipe"): the
    # paper's uniform mean gave the best sub-models with the last exit no worse than SFT's.
    # If the last exit pays on your model, try exit_weights="last" first.
    c.exit_weights = "uniform"
    return c
