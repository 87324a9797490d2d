"""Pre-training data: read raw documents, tokenize them once into token shards, and stream packed batches.

``forgeline data prepare`` is :func:`prepare_dataset`; training reads the result with :class:`PackedTokenLoader`.
"""

from .loader import PackedTokenLoader
from .shards import FORMAT, INDEX_FILE, VERSION, check_tokenizer, load_index, prepare_dataset, token_dtype
from .sources import iter_documents, iter_file_documents, resolve_inputs

__all__ = [
    "FORMAT",
    "INDEX_FILE",
    "VERSION",
    "PackedTokenLoader",
    "check_tokenizer",
    "iter_documents",
    "iter_file_documents",
    "load_index",
    "prepare_dataset",
    "resolve_inputs",
    "token_dtype",
]
