"""SFT baseline for `soft_7b.py`: the same recipe with the exit set {32} (the last layer only);
the held-out loss is still reported at exits 12,16,...,32 for comparison.

    python -m sorted_jax.train --config=configs/sft_7b.py --workdir=/ckpt/sft_7b \\
        --config.init_from=/models/llama2-7b
"""

from sorted_jax.training.train_config import alpaca_config


def get_config():
    return alpaca_config(preset="llama2-7b", exits="last", eval_exits="12,16,20,24,28,32")
