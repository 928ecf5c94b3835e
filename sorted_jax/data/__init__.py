"""Data for SoFT: prompt templates, record sources, tokenizers, deterministic batching.

Importing this package is light (numpy only); sentencepiece, transformers and
tensorflow-datasets are imported when a loader needs them. Modules, lowest first: `chat`
(conversations, the tokenizer's chat template, assistant spans), `records` (the record types,
their errors, JSON files, `spec_kind`), `tokenizers`, `templates` (text templates, generation
prompts), `builtin`, `alpaca_tfds`, `sources` (every source behind one spec string),
`pipeline` (tokenizing, batching), `packing` (several examples per row).
"""

from sorted_jax.data.builtin import builtin_records
from sorted_jax.data.chat import (
    ChatTemplateError,
    chat_prompt_ids,
    encode_chat,
    render_chat,
    validate_messages,
)
from sorted_jax.data.packing import PackedIterator, collate_packed, pack_rows
from sorted_jax.data.pipeline import (
    BATCH_KEYS,
    DataIterator,
    EvalIterator,
    TokenizedDataset,
    choose_bucket,
    collate,
    default_buckets,
    encode_prompt_response,
    epoch_permutation,
    steps_per_epoch,
    tokenize_example,
    tokenize_records,
)
from sorted_jax.data.records import (
    ChatRecord,
    DataError,
    Record,
    SourceError,
    read_json_records,
    spec_kind,
    validate_record,
)
from sorted_jax.data.sources import (
    holdout_split,
    load_records,
    open_records,
    open_split,
    open_split_records,
    read_tfds_records,
    split_records,
)
from sorted_jax.data.templates import (
    PROMPT_TEMPLATES,
    TEMPLATE_NAMES,
    TEMPLATES,
    format_example,
    format_prompt,
    prompt_ids,
)
from sorted_jax.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    bos_prefix,
    load_tokenizer,
    save_tokenizer_files,
)

__all__ = [
    "BATCH_KEYS",
    "PROMPT_TEMPLATES",
    "TEMPLATES",
    "TEMPLATE_NAMES",
    "ChatRecord",
    "ChatTemplateError",
    "PackedIterator",
    "ByteTokenizer",
    "DataError",
    "SourceError",
    "DataIterator",
    "EvalIterator",
    "HFTokenizer",
    "Record",
    "SentencePieceTokenizer",
    "TokenizedDataset",
    "Tokenizer",
    "bos_prefix",
    "builtin_records",
    "chat_prompt_ids",
    "collate_packed",
    "encode_chat",
    "choose_bucket",
    "collate",
    "default_buckets",
    "encode_prompt_response",
    "epoch_permutation",
    "format_example",
    "format_prompt",
    "holdout_split",
    "load_records",
    "open_records",
    "open_split",
    "open_split_records",
    "pack_rows",
    "prompt_ids",
    "render_chat",
    "load_tokenizer",
    "read_json_records",
    "read_tfds_records",
    "save_tokenizer_files",
    "spec_kind",
    "split_records",
    "steps_per_epoch",
    "tokenize_example",
    "tokenize_records",
    "validate_messages",
    "validate_record",
]
