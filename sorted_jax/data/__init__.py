"""Data for SoFT: prompt templates, record sources, tokenizers, deterministic batching.

Importing this package is light (numpy only); sentencepiece, transformers and
tensorflow-datasets are imported when a loader needs them. Modules, lowest first: `records`
(the record type, its errors, JSON files, `spec_kind`), `templates`, `tokenizers`, `builtin`,
`alpaca_tfds`, `sources` (every source behind one spec string), `pipeline` (tokenizing,
batching).
"""

from sorted_jax.data.builtin import builtin_records
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
    read_tfds_records,
    split_records,
)
from sorted_jax.data.templates import TEMPLATES, format_example, format_prompt
from sorted_jax.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    save_tokenizer_files,
)

__all__ = [
    "BATCH_KEYS",
    "TEMPLATES",
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
    "builtin_records",
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
    "load_tokenizer",
    "read_json_records",
    "read_tfds_records",
    "save_tokenizer_files",
    "spec_kind",
    "split_records",
    "steps_per_epoch",
    "tokenize_example",
    "tokenize_records",
    "validate_record",
]
