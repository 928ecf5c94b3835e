"""SoFT of LLaMA-2 13B (40 layers) on Stanford Alpaca, exits 12,16,...,40 as in the paper.

    python -m sorted_jax.train --config=configs/soft_13b.py --workdir=/ckpt/soft_13b \\
        --config.init_from=/models/llama2-13b
"""

from sorted_jax.training.train_config import alpaca_config


def get_config():
    c = alpaca_config(preset="llama2-13b", exits="12,16,20,24,28,32,36,40")
    # The one-run recipe (docs/training.md, "Choosing a recipe"): half the loss weight on the
    # last exit, the rest shared by the sub-models. Of the one-run recipes it cost the full
    # model least (last exit +4% over SFT on the demo, +15% on SmolLM2, against +16% / +27% for
    # the paper's uniform mean), sub-models far better than SFT's. When the full model must not
    # pay at all: SFT, then exit adapters (configs/soft_7b_adapters.py).
    # exit_weights="uniform" is the paper's mean.
    c.exit_weights = "last"
    return c
