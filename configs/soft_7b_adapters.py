"""Step 2 of "SFT, then exit adapters" for LLaMA-2 7B on Stanford Alpaca: the full model stays
exactly the SFT model, and every sub-model gets one trained decoder layer.

    python -m sorted_jax.train --config=configs/sft_7b.py --workdir=/ckpt/sft_7b \\
        --config.init_from=/models/llama2-7b                         # step 1: plain SFT
    python -m sorted_jax.train --config=configs/soft_7b_adapters.py --workdir=/ckpt/adapters_7b \\
        --config.init_from=/ckpt/sft_7b                              # step 2: this config

The SFT run's weights are frozen (no gradient, no optimizer state for them); exits 12,16,...,28
each get one decoder layer, initialised from the layer after the exit, before the shared final
norm and head, trained with the mean of the exits' cross-entropies plus 1.0 x KL toward the
frozen full model's distribution. The last exit is the SFT model, bit for bit. The recipe that
kept the full model at SFT's loss with the best sub-models on both the demo and SmolLM2:
docs/training.md, "Choosing a recipe". Everything else is the paper's recipe (`sft_7b.py`).
"""

from sorted_jax.training.train_config import alpaca_config


def get_config():
    c = alpaca_config(preset="llama2-7b", exits="12,16,20,24,28,32")
    c.exit_adapters = "layer"  # one decoder layer per exit below the last, on a frozen trunk
    c.exit_adapter_init = "next"  # each a copy of the trunk layer after its exit
    c.distill_weight = 1.0  # + KL(frozen full model || exit k): learn what the SFT model predicts
    c.exit_weights = "uniform"  # the last exit is frozen: its weight only scales the loss
    # 10x the SFT run's rate: only the adapters train, each starting from a trunk layer that
    # was never an exit. On SmolLM2 the SFT rate (1e-4) left them far from trained after 40
    # steps, 10x (1e-3) beat every one-run SoFT recipe at every exit (docs/training.md).
    c.optim.lr = 2e-4
    return c
