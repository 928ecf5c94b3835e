"""Stage 2 of the pretrained-then-SoFT CPU demo: fine-tune pretrained weights on new tasks.

    python -m sorted_jax.train --config=configs/tiny_pretrain.py --workdir=runs/tiny_base
    python -m sorted_jax.train --config=configs/tiny_finetune.py --workdir=runs/tiny_soft \\
        --config.init_from=runs/tiny_base
    python -m sorted_jax.sweep --config=configs/tiny_finetune.py --out=runs/sweep \\
        --pretrain-config=configs/tiny_pretrain.py --seeds=0,1,2 --recipe=uniform ...

The situation users are in: a pretrained model (stage 1 trained only its last exit) fine-tuned
on an instruction set it has not seen (`builtin:instruct`: first letter, count the letters,
repeat twice), SoFT at exits 2, 4, 6, 8 vs SFT, at a fine-tuning learning rate. The recipe knobs
(exit_weights, exit_curriculum, distill_weight) trade the last exit's loss against the
sub-models'; docs/training.md, "Choosing a recipe", has the measured table.
"""

from sorted_jax.training.train_config import default_config


def get_config():
    c = default_config()
    c.model.preset = ""  # the architecture comes from init_from
    c.init_from = "runs/tiny_base"  # stage 1's workdir
    c.exits = "2,4,6,8"
    c.eval_exits = "2,4,6,8"
    c.data.train = "builtin:instruct"
    c.data.eval = ""
    c.data.tokenizer = ""  # init_from's (the builtin byte tokenizer)
    c.data.template = "plain"
    c.max_len = 48
    c.data.buckets = "48"
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.attention_impl = "xla"
    c.batch_size = 32
    c.num_steps = 300
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = "cosine"
    c.optim.end_lr_ratio = 0.1
    c.log_every = 20
    c.eval_every = 100
    c.checkpoint_every = 300
    c.keep_checkpoints = 1
    c.mesh.shape = (-1, 1, 1)
    return c
