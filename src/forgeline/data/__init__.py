"""Pre-training data: read raw documents, tokenize them once into token shards, and stream packed batches.

``forgeline data prepare`` is :func:`prepare_dataset`; training reads the result with :class:`PackedTokenLoader`.
SFT data: records to conversations (:mod:`.sft`), chat templates and loss masks (:mod:`.chat_templates`), packed or
padded batches (:mod:`.packing`).
"""

from .chat_templates import ChatTemplate, load_chat_template
from .loader import PackedTokenLoader
from .packing import SFTLoader, TokenizedSample, best_fit_decreasing, collate_packed, collate_padded
from .shards import FORMAT, INDEX_FILE, VERSION, check_tokenizer, load_index, prepare_dataset, token_dtype
from .sft import SFTFields, SFTStats, iter_sft_examples, load_sft_samples, tokenize_examples
from .sources import iter_documents, iter_file_documents, resolve_inputs

__all__ = [
    "FORMAT",
    "INDEX_FILE",
    "VERSION",
    "ChatTemplate",
    "PackedTokenLoader",
    "SFTFields",
    "SFTLoader",
    "SFTStats",
    "TokenizedSample",
    "best_fit_decreasing",
    "check_tokenizer",
    "collate_packed",
    "collate_padded",
    "iter_documents",
    "iter_file_documents",
    "iter_sft_examples",
    "load_chat_template",
    "load_index",
    "load_sft_samples",
    "prepare_dataset",
    "resolve_inputs",
    "token_dtype",
    "tokenize_examples",
]
