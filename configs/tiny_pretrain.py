"""Stage 1 of the pretrained-then-SoFT CPU demo: base weights for `configs/tiny_finetune.py`.

    python -m sorted_jax.train --config=configs/tiny_pretrain.py --workdir=runs/tiny_base

The "tiny" LLaMA (8 layers, width 128) trained as a plain model (SFT: the last exit only) on one
family of the built-in tasks (`builtin:pretrain`: reverse, sort, copy, shift, uppercase, add),
so that, like a real pretrained checkpoint, its last layer is good and its intermediate layers
were never asked to be exits. No download, no GPU.
"""

from sorted_jax.training.train_config import default_config


def get_config():
    c = default_config()
    c.model.preset = "tiny"
    c.model.vocab_size = 264  # the builtin byte tokenizer
    c.exits = "last"
    c.eval_exits = "2,4,6,8"
    c.data.train = "builtin:pretrain"
    c.data.eval = ""
    c.data.tokenizer = "builtin"
    c.data.template = "plain"
    c.max_len = 48
    c.data.buckets = "48"
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.attention_impl = "xla"
    c.batch_size = 32
    c.num_steps = 1000
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = "cosine"
    c.optim.end_lr_ratio = 0.1
    c.log_every = 20
    c.eval_every = 250
    c.checkpoint_every = 500
    c.keep_checkpoints = 1
    c.mesh.shape = (-1, 1, 1)
    return c
