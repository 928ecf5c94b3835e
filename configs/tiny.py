"""The built-in CPU job: SoFT of the "tiny" LLaMA on the generated toy instruction set.

    python -m sorted_jax.train --config=configs/tiny.py --workdir=/tmp/soft_tiny
    python -m sorted_jax.train --config=configs/tiny.py --workdir=/tmp/sft_tiny --config.exits=last

No download, no GPU: the byte tokenizer (264 ids) and the builtin data (4000 train / 1000
held-out records, ~4.9k held-out target tokens). Trains from random init for 600 steps in ~4.5
minutes on 2 CPU cores. SFT reports the held-out loss at every exit too (eval_exits), so the two
exit tables compare directly. Measured over seeds 0-4 (SFT minus SoFT held-out loss): exits 2/4/6
are better under SoFT on every seed (by 0.95-1.31, 0.54-0.96 and 0.25-0.81 nats); exit 8 on 4
of 5 seeds (+0.09 to +0.30 nats, but -0.07 on seed 2; mean +0.11). See docs/training.md.
"""

from sorted_jax.training.train_config import default_config


def get_config():
    c = default_config()
    c.model.preset = "tiny"  # 8 layers, width 128, 4 heads (2 kv heads), 1.5M params
    c.model.vocab_size = 264  # the builtin byte tokenizer
    c.exits = "2,4,6,8"
    c.eval_exits = "2,4,6,8"  # also for the SFT run (--config.exits=last)
    c.data.train = "builtin"
    c.data.eval = ""  # builtin's own held-out split
    c.data.tokenizer = "builtin"
    c.data.template = "plain"
    c.max_len = 48  # the longest builtin example is 41 tokens
    c.data.buckets = "48"  # one sequence length: one compilation
    c.dtype = "float32"  # as fast as bf16 on CPU at this size, and no rounding noise
    c.param_dtype = "float32"
    c.attention_impl = "xla"
    c.batch_size = 32
    c.num_steps = 600
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = "cosine"
    c.optim.end_lr_ratio = 0.1
    c.optim.weight_decay = 0.0
    c.log_every = 5
    c.eval_every = 100
    c.eval_at_start = True
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.mesh.shape = (-1, 1, 1)
    return c
