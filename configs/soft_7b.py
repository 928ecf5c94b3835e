"""SoFT of LLaMA-2 7B on Stanford Alpaca, the paper's recipe (arXiv 2309.08968, Sec. 4).

    python -m sorted_jax.convert hf-to-orbax ... --out=/models/llama2-7b   # base weights
    python -m sorted_jax.train --config=configs/soft_7b.py --workdir=/ckpt/soft_7b \\
        --config.init_from=/models/llama2-7b [--config.data.train=/data/alpaca_data.json]

Exits 12,16,...,32 (every 4th layer from 12), lr 2e-5 cosine with 3% warmup, 2 epochs,
effective batch 32 (4 micro-batches of 8), bf16 compute on fp32 master weights, FSDP over all
devices, remat of the scanned layers. Exit weights `last` (half on the last exit; the paper
uses the mean, `--config.exit_weights=uniform`): docs/training.md, "Choosing a recipe", which
also has the two-run recipe that keeps the full model at SFT's loss (`soft_7b_adapters.py`).
"""

from sorted_jax.training.train_config import alpaca_config


def get_config():
    c = alpaca_config(preset="llama2-7b", exits="12,16,20,24,28,32")
    # The one-run recipe (docs/training.md, "Choosing a recipe"): half the loss weight on the
    # last exit, the rest shared by the sub-models. Of the one-run recipes it cost the full
    # model least (last exit +4% over SFT on the demo, +15% on SmolLM2, against +16% / +27% for
    # the paper's uniform mean), sub-models far better than SFT's. When the full model must not
    # pay at all: SFT, then exit adapters (configs/soft_7b_adapters.py).
    # exit_weights="uniform" is the paper's mean.
    c.exit_weights = "last"
    return c
