"""The training config: every field `python -m sorted_jax.train` reads, with its default.

Config files in `configs/` start from :func:`default_config` (or :func:`alpaca_config`, the
paper's recipe) and change what they need; the CLI then applies `--config.a.b=value`
overrides. The dict is locked, so a misspelt key fails at parse time instead of being ignored.

The schema lives in the package (not in `configs/base.py`) because ml_collections loads a
config file by path: a file in `configs/` cannot reliably import its siblings, but it can always
import `sorted_jax`.
"""

from __future__ import annotations

import ml_collections

from sorted_jax.parallel.sharding import DEFAULT_RULES


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # -- model -------------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    # A name from sorted_jax.model.config.PRESETS; "" = take the architecture from `init_from`.
    c.model.preset = "tiny"
    # Overrides of the preset; 0 keeps the preset's value.
    c.model.vocab_size = 0
    c.model.hidden_size = 0
    c.model.intermediate_size = 0
    c.model.num_hidden_layers = 0
    c.model.num_attention_heads = 0
    c.model.num_key_value_heads = 0
    c.model.max_position_embeddings = 0

    # Base weights: a model dir (`python -m sorted_jax.convert hf-to-orbax`) or a training
    # workdir (its latest step). "" = random init. Loading weights gives a fresh optimizer at
    # step 0; re-running a command on a workdir that has checkpoints resumes that run instead.
    c.init_from = ""

    # Exit set: "default" (12,16,...,L for LLaMA-2), "12,16,20", "all", or "last" (= SFT).
    c.exits = "default"
    # Exits reported on the held-out set (same syntax); "" = the training exits. An SFT run
    # (exits "last") sets the SoFT exits here to show what its intermediate exits are worth.
    c.eval_exits = ""
    # Per-exit loss weights: "" / "uniform" = the paper's mean; a scheme "last[:F]" (the last
    # exit gets F, default 0.5), "depth", "sqrt" (soft.weight_scheme: what each trades); or
    # comma-separated numbers, one per exit, used as given.
    c.exit_weights = ""
    # Curriculum of the exit weights (fractions of the run's steps): train as SFT for `hold`,
    # then ramp linearly to exit_weights over `ramp`. 0, 0 = exit_weights from the start.
    c.exit_curriculum = ml_collections.ConfigDict()
    c.exit_curriculum.hold = 0.0
    c.exit_curriculum.ramp = 0.0
    # > 0: also distil every exit toward the last exit's (detached) distribution with this
    # weight (KL per token, added to the loss; reported as kl_to_last/exit_N).
    c.distill_weight = 0.0
    # Keeping the full model where SFT takes it (docs/training.md, "Choosing a recipe"):
    # > 0: anchored SoFT, also adds anchor_weight x KL(teacher || last exit) per token, a frozen
    # teacher's distribution on the same tokens (reported as kl_to_teacher/exit_N).
    c.anchor_weight = 0.0
    # The teacher: "base" (init_from's weights, as loaded at step 0) or a model dir / workdir
    # (e.g. a finished SFT run). Its vocab must be the model's; it is held frozen beside the
    # model (memory: one more copy of its weights in param_dtype).
    c.anchor_teacher = "base"
    # "none": SoFT trains the whole model. "layer": the trunk (init_from, a base or an SFT
    # model) is frozen and every exit below the last gets its own decoder layer before the
    # shared final norm + head; only those train (use distill_weight for the KL toward the
    # frozen full model). The last exit is then the trunk's own output, bit for bit.
    c.exit_adapters = "none"
    # Where an exit adapter starts: "next" = a copy of the layer right after its exit, "last"
    # = a copy of the last layer.
    c.exit_adapter_init = "next"
    # LoRA / QLoRA (docs/lora.md, "SoFT on one GPU"): init_from's weights are a frozen base
    # and every targeted projection of every layer learns a low-rank update
    # W + (alpha / rank) A @ B (A: rank x in, B: out x rank; B starts at 0, so step 0 is the
    # base). Only the adapters train (no gradient, optimizer state or master copy of the base),
    # and checkpoints hold only them; every command reads the run's workdir with the adapters
    # merged into the base. rank 0 = full fine-tuning (the default).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0  # the update's scale is alpha / rank (PEFT's lora_alpha)
    c.lora.dropout = 0.0  # dropout on the adapters' input while training
    # Comma-separated projections that get adapters: any of q,k,v,o,gate,up,down.
    c.lora.targets = "q,k,v,o,gate,up,down"
    # How the frozen base is held: bfloat16 | float32, or quantised QLoRA-style in blocks of 64
    # along the model width with an fp32 absmax each: int8 (8.5 bits per weight), nf4 or int4
    # (4.5 bits; nf4 is QLoRA's NormalFloat). Embeddings, norms and head stay bfloat16.
    # Adapters train in param_dtype.
    c.lora.base_dtype = "bfloat16"
    c.lora.train_norms = False  # also train the layer norms and the final norm

    c.seed = 0  # parameter init and the data shuffle order
    c.dtype = "bfloat16"  # compute dtype
    c.param_dtype = "float32"  # master weights and optimizer state
    c.attention_impl = "auto"  # xla | cudnn | auto (cudnn on GPU with bf16)
    c.remat_policy = "none"  # sorted_jax.model.modeling.REMAT_POLICY_NAMES
    c.loss_rows_per_chunk = 4096  # bounds the logits held at once in the multi-exit loss

    # -- data --------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    # "builtin" (toy set, no download), "tfds:NAME" (array_record, no TensorFlow needed), or a
    # path to a JSON list / JSONL file of {instruction, input, output} or chat records.
    c.data.train = "builtin"
    c.data.train_split = "train"
    # Held-out set: "" = the train source's `eval_split` (builtin, TFDS; a JSON file has none:
    # use eval_holdout), "none" = no evaluation, or another source spec.
    c.data.eval = ""
    c.data.eval_split = "eval"
    # > 0: hold out this many train records (seeded by data.seed) as the eval set instead.
    c.data.eval_holdout = 0
    c.data.tfds_data_dir = ""
    # "builtin", a SentencePiece .model, or a tokenizer dir; "" = the tokenizer of init_from.
    c.data.tokenizer = "builtin"
    # alpaca | plain | chat (the tokenizer's own chat template; for chat records
    # {"messages": [...]} / {"conversations": [...]} and instruction records alike)
    c.data.template = "alpaca"
    c.data.buckets = ""  # padded sequence lengths, e.g. "128,256,512"; "" = powers of two
    # Pack several examples into each max_len row (segment ids, per-example positions);
    # evaluation stays unpacked. data.buckets then pads the evaluation batches only (a note).
    c.data.packing = False
    c.data.shuffle = True
    c.data.max_records = 0  # > 0: use only the first N train records (smoke runs)
    c.data.seed = 0  # builtin generation and eval_holdout split

    c.max_len = 512  # tokens per sequence, BOS/EOS included (longer responses are truncated)

    # -- schedule ----------------------------------------------------------------------------
    c.batch_size = 32  # global batch (sequences per optimizer step), over all processes
    c.grad_accum = 1  # micro-batches per step: each is batch_size / grad_accum sequences
    c.epochs = 2.0  # used when num_steps == 0
    c.num_steps = 0  # > 0: train exactly this many steps

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-5
    c.optim.schedule = "cosine"  # cosine | linear | constant (after warmup)
    c.optim.warmup_ratio = 0.03  # in [0, 1]: of the total steps, used when warmup_steps < 0
    c.optim.warmup_steps = -1
    c.optim.end_lr_ratio = 0.0  # in [0, 1]: the final lr as a fraction of lr
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0  # 0 = no clipping
    # Adam's first moment dtype: "" = fp32 (the master weights' dtype), "bfloat16" saves 2
    # bytes per parameter. bf16 params keep an fp32 master copy in the optimizer state.
    c.optim.mu_dtype = ""

    # -- loop --------------------------------------------------------------------------------
    c.log_every = 10
    c.eval_every = 0  # steps; 0 = only at the end
    c.eval_at_start = False
    c.eval_batches = 0  # 0 = the whole held-out set
    c.eval_batch_size = 0  # 0 = the micro-batch size (batch_size / grad_accum)
    c.checkpoint_every = 500  # steps; a checkpoint is also written at the end and on SIGTERM
    c.keep_checkpoints = 3  # newest N kept, and always the newest healthy one; 0 = keep all
    # Resuming: -1 = the newest intact checkpoint (damaged or diverged newer steps are passed
    # over, with a message); N = resume from step N (later steps are moved to set_aside/).
    c.resume_step = -1
    c.async_checkpointing = True
    c.tensorboard = True
    # Persistent XLA compilation cache ("" = off): a restarted or resumed run skips compiling.
    c.compilation_cache_dir = ""

    # -- devices -----------------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
    c.mesh.rules = tuple(DEFAULT_RULES)  # logical axis -> mesh axes

    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False
    # "" with enabled=True: jax.distributed.initialize() auto-detects (TPU pods, SLURM, ...).
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0  # 0 = auto
    c.distributed.process_id = -1  # -1 = auto
    c.distributed.cpu_collectives = "gloo"  # CPU-only multi-process runs
    c.distributed.initialization_timeout = 300
    return c


def alpaca_config(preset: str, exits: str, eval_exits: str = "") -> ml_collections.ConfigDict:
    """The paper's recipe (arXiv 2309.08968, Sec. 4): Stanford Alpaca with its template, loss on
    responses, lr 2e-5 cosine, ~3% warmup, 2 epochs, effective batch 32, bf16 compute on fp32
    master weights, FSDP over all devices with remat."""
    c = default_config()
    c.model.preset = preset
    c.exits = exits
    c.eval_exits = eval_exits
    # Prepare once (no TensorFlow needed):
    #   python -c "from sorted_jax.data.alpaca_tfds import prepare_alpaca; prepare_alpaca('DIR')"
    # or point at the release file: --config.data.train=/path/alpaca_data.json
    c.data.train = "tfds:stanford_alpaca"
    c.data.tfds_data_dir = ""
    c.data.eval = ""
    c.data.eval_holdout = 500  # Alpaca has only a train split
    c.data.tokenizer = ""  # the LLaMA-2 tokenizer that came with init_from
    c.data.template = "alpaca"
    c.max_len = 512
    c.batch_size = 32
    c.grad_accum = 4  # micro-batches of 8; set 1 where memory allows
    c.epochs = 2.0
    c.optim.lr = 2e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.03
    c.dtype = "bfloat16"
    c.param_dtype = "float32"
    c.attention_impl = "auto"
    c.remat_policy = "dots_with_no_batch_dims_saveable"
    c.mesh.shape = (1, -1, 1)
    c.log_every = 10
    c.eval_every = 200
    c.eval_batches = 0
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    return c


def one_gpu_lora_config(preset: str, exits: str, base_dtype: str) -> ml_collections.ConfigDict:
    """The paper's recipe (`alpaca_config`, exit weights `last`) as LoRA on one device: rank-16
    adapters (alpha 32) on every projection over a frozen `base_dtype` base, fp32 adapters,
    lr 2e-4 (LoRA's usual rate: the adapters start at zero), micro-batches of 4 rows of up to
    2048 tokens (x 8 accumulated = 32), full remat (docs/lora.md: SoFT on one GPU)."""
    c = alpaca_config(preset, exits)
    c.exit_weights = "last"
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = "q,k,v,o,gate,up,down"
    c.lora.base_dtype = base_dtype
    c.param_dtype = "float32"
    c.optim.lr = 2e-4
    c.max_len = 2048  # rows are padded to a power of two, up to this
    c.batch_size = 32
    c.grad_accum = 8
    c.remat_policy = "full"
    c.mesh.shape = (1, 1, 1)
    return c
