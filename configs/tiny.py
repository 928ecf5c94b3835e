"""The built-in CPU job: SoFT of the "tiny" LLaMA on the generated toy instruction set.

    python -m sorted_jax.train --config=configs/tiny.py --workdir=/tmp/soft_tiny
    python -m sorted_jax.train --config=configs/tiny.py --workdir=/tmp/sft_tiny --config.exits=last

No download, no GPU: the byte tokenizer (264 ids) and the builtin data (4000 train / 200 held-out
records). Trains from random init in ~1.5-2.5 minutes on 2 CPU cores. SFT reports the held-out
loss at every exit too (eval_exits), so the two exit tables compare directly: SoFT's exits 2/4/6
are far better than SFT's (0.1-0.9 nats at seeds 0, 1, 2); at exit 8 the two are within seed
noise (SoFT -0.08, -0.23, +0.06 nats), and the gap closes with longer training.
"""

from sorted_jax.train_config import default_config


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
    c.num_steps = 150
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = "cosine"
    c.optim.end_lr_ratio = 0.1
    c.optim.weight_decay = 0.0
    c.log_every = 5
    c.eval_every = 25
    c.eval_at_start = True
    c.checkpoint_every = 50
    c.keep_checkpoints = 2
    c.mesh.shape = (-1, 1, 1)
    return c
