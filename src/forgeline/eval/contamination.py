"""Benchmark contamination: which evaluation items a model may have seen in its training data.

Both checks compare text after one normalisation (:func:`normalize`): Unicode NFKC, lowercase, punctuation deleted
(every Unicode ``P*`` character plus ASCII's symbols, as lm-evaluation-harness's decontamination module deletes
``string.punctuation``), whitespace collapsed; words are the whitespace-separated tokens. Deleting punctuation
rather than turning it into spaces keeps "don't" and "dont" one word, as the harness does.

**Exact n-gram overlap** (:class:`NgramIndex`). Every word n-gram of the training data (n = 13 by default, the size
GPT-3's contamination study and the harness use) is kept as a 64-bit hash in a sorted numpy array, never as text.
An item's overlap is the fraction of its n-gram positions found anywhere in the index; the item is flagged when
that fraction is >= ``threshold`` (0.5). An item of fewer than n words is one n-gram of all its words; the index
can only answer for such a length if it also indexed the training data's m-grams of that length
(``short_lengths``), which :func:`check_contamination` arranges for the lengths its items have. Each stored hash
also remembers the first training document that contained it, so a flagged item names where it was found.

**Near duplicates** (:class:`NearDuplicateIndex`). MinHash signatures (``datasketch``, the ``eval`` extra) of
word 5-gram shingles of every training document, in a ``MinHashLSH`` index tuned for Jaccard similarity >= 0.8
and weighted towards recall (a pair at 0.8 becomes a candidate 95% of the time, at 0.85 99%); a candidate is kept
when the similarity estimated from the two signatures reaches the threshold. Documents longer
than ``window`` words (200) are cut into windows overlapping by half, so an item at least one and a half windows
long (a passage, a program) holds a whole training window wherever it sits in a long document; items longer than a
window are queried window by window, sliding by a tenth of one, so that some query window lines up with each
training window to within 5%. What the fuzzy check finds is therefore a training document, or a stretch of a long
one, that is as a whole a near copy of the item; a short item inside a long document is at most (its length /
window) similar to any window, and finding it is the exact check's job. Word 5-grams are strict: each changed word
removes up to five shingles, so with the defaults an item stays above 0.8 with about one changed word per 45
(measured: a 166-word item with two words changed estimates 0.88 on average, a 76-word one 0.74), and the exact
check, through the unchanged 13-word runs, flags such light edits as well (overlap 0.83 and 0.59 there); the fuzzy
check adds the similarity and the one training document that holds the whole item.

Training sources (:data:`Sources`): paths, globs, directories or :class:`TrainingSource` values naming the format
where the suffix does not tell it:

* ``text``: ``.txt``, ``.md`` (and ``.gz`` of them). Documents are paragraphs (runs of non-blank lines), or, in a
  file whose first MiB has a line that is just ``<|endoftext|>`` (TinyStories-style), the text between such lines.
  Source ``file:line`` of the document's first line.
* ``jsonl`` (``.jsonl``, ``.ndjson``, ``.gz`` of them) and ``json`` (an array of records, read whole): each record
  is one document made of every string it holds, recursively (chat ``messages`` contents, ``prompt`` /
  ``completion``, ``chosen`` / ``rejected``, ``instruction`` / ``input`` / ``output``, ...), joined by newlines in
  record order so that n-grams run from a question into its answer. Source ``file:line`` / ``file: record i``.
* ``parquet``: every column whose type holds strings (nested lists and structs too), one document per row.
  Source ``file: row i``.
* ``shards``: a token-shard directory written by ``forgeline data prepare`` (it has an ``index.json``). Both splits
  are decoded in chunks of a million tokens and split on the end-of-text id, so documents never merge;
  the tokenizer is the dataset's own copy unless one is passed (it must then have the dataset's fingerprint).
  Source ``dir: train document i``.

A directory that is not a token-shard dataset is searched recursively for files of these kinds (hidden ones
skipped, others skipped with a warning). Bad input (missing file, malformed JSON line, invalid UTF-8, a file that
holds no text) is a :class:`~forgeline.errors.DataError` naming the file and line, from the readers of
:mod:`forgeline.data.sources`.

Memory: the exact index costs 16 bytes per distinct n-gram (8 with ``track_sources=False``) plus, while building,
a quarter of that for hashes not yet merged; the near-duplicate index about 6 KB per window (the signature kept
for the Jaccard estimate plus datasketch's band tables). Text is read one document at a time; a text paragraph
longer than 8 MiB is cut there, losing the n-grams that span the cut.

API::

    normalize(text) -> str
    BenchmarkItem(task, item_id, text)                      the text a model would see: question + choices/answer
    TrainingSource(path, format=None)                        format: text | jsonl | json | parquet | shards
    NgramIndex(n=13, *, short_lengths=(), track_sources=True)
        .build(sources, *, n=13, short_lengths=(), tokenizer=None, track_sources=True) -> NgramIndex  (classmethod)
        .add_sources(sources, *, tokenizer=None); .add_text(text, source="<text>")
        .overlap(text) -> (fraction, matched, total); .source_of(text) -> str | None
        len(index) (distinct hashes), .nbytes, .stats (IndexStats)
    NearDuplicateIndex(*, threshold=0.8, num_perm=128, shingle=5, window=200)
        .build(sources, *, threshold, num_perm, shingle, window, tokenizer=None) -> NearDuplicateIndex
        .add_sources(...); .add_text(...); .query(text) -> list[NearDuplicate(jaccard, source)], best first
        len(index) (windows), .stats
    check_contamination(items, sources, *, n=13, threshold=0.5, fuzzy=True, jaccard=0.8, num_perm=128, shingle=5,
                        window=200, tokenizer=None) -> ContaminationReport     one pass over the training data
    check_items(items, ngram_index, near_index=None, *, threshold=0.5) -> ContaminationReport
    ContaminationReport: .tasks {task: TaskSummary(items, exact, fuzzy, either, clean)}, .flagged [FlaggedItem],
        .clean_ids(task) -> set[str], .flagged_ids(task) -> set[str], .to_dict(), .to_markdown()
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import json
import logging
import os
import string
import sys
import time
import unicodedata
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..data.shards import INDEX_FILE, TOKENIZER_DIR, check_tokenizer, load_index, token_dtype
from ..data.sources import iter_jsonl_lines, read_json_records
from ..errors import ConfigError, DataError, ForgelineError

__all__ = [
    "BenchmarkItem",
    "ContaminationReport",
    "FlaggedItem",
    "IndexStats",
    "NearDuplicate",
    "NearDuplicateIndex",
    "NgramIndex",
    "Sources",
    "TaskSummary",
    "TrainingSource",
    "check_contamination",
    "check_items",
    "normalize",
]

logger = logging.getLogger(__name__)

FORMATS = ("text", "jsonl", "json", "parquet", "shards")
_TEXT_SUFFIXES = (".txt", ".md", ".text", ".markdown")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_END_OF_TEXT_LINE = "<|endoftext|>"
_GLOB_CHARS = frozenset("*?[")

# Documents are hashed in batches of about this many words: one set of numpy calls per batch instead of per
# document keeps millions of short JSONL records from being dominated by per-call overhead.
_BATCH_WORDS = 1 << 20
# Hashes wait in a pending list until there are this many (or a quarter of the index), then merge into the sorted
# array in one linear pass; merging geometrically keeps the total cost linear in the index size.
_MERGE_MIN = 1 << 22
_WORD_CACHE_LIMIT = 1 << 18
_MAX_DOCUMENT_CHARS = 8 << 20
_DECODE_CHUNK_TOKENS = 1 << 20
_PARQUET_BATCH_ROWS = 4096
_SNIFF_BYTES = 1 << 20

# Odd, so multiplying by it is a bijection mod 2^64 and n-grams that differ in one word never collide.
_ROLL = np.uint64(0x9E3779B97F4A7C15)
# Mixed in per length so that an m-gram and an n-gram stored side by side cannot be mistaken for each other.
_LENGTH_SALT = 0xD6E8FEB86659FD93
_MINHASH_SEED = 1
# (false positive, false negative) weights of datasketch's band optimiser; with 128 permutations and threshold 0.8
# this gives 16 bands of 8, which make a pair of similarity 0.8 a candidate 95% of the time (the even weights'
# 9 bands of 13: 40%) and one of 0.5 6% of the time.
_LSH_WEIGHTS = (0.05, 0.95)


# --------------------------------------------------------------------------------------------- normalisation


@functools.cache
def _punctuation_table() -> dict[int, None]:
    # Built on first use: scanning every code point takes about a tenth of a second, which imports should not pay.
    table = {c: None for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P")}
    table.update(dict.fromkeys(map(ord, string.punctuation)))
    return table


def _words(text: str) -> list[str]:
    # NFKC before lowercasing: compatibility forms such as fullwidth capitals only become ordinary capitals there.
    return unicodedata.normalize("NFKC", text).lower().translate(_punctuation_table()).split()


def normalize(text: str) -> str:
    """The text both checks compare: NFKC, lowercase, punctuation deleted, whitespace collapsed to single spaces."""
    return " ".join(_words(text))


_word_cache: dict[str, int] = {}


def _word_hashes(words: Sequence[str]) -> np.ndarray:
    """A stable 64-bit hash per word; a bounded cache makes repeated words (most of any corpus) a dict lookup."""
    cache = _word_cache
    try:
        return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))
    except KeyError:
        pass
    if len(cache) > _WORD_CACHE_LIMIT:
        cache.clear()
    for word in words:
        if word not in cache:
            cache[word] = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
    return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))


def _gram_hashes(word_hashes: np.ndarray, m: int) -> np.ndarray:
    """Hash of every run of ``m`` consecutive words (a polynomial in the word hashes, wrapping mod 2^64)."""
    count = len(word_hashes) - m + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    grams = word_hashes[:count].copy()
    for j in range(1, m):
        grams *= _ROLL
        grams += word_hashes[j : j + count]
    grams ^= np.uint64((_LENGTH_SALT * m) & 0xFFFFFFFFFFFFFFFF)
    return grams


# -------------------------------------------------------------------------------------------- reading sources


@dataclass(frozen=True)
class TrainingSource:
    """A training-data path with its format given explicitly, for files whose suffix does not tell it."""

    path: str | os.PathLike
    format: str | None = None

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise ConfigError(f"unknown training-data format {self.format!r} (expected one of {', '.join(FORMATS)})")


Sources = Union[str, os.PathLike, TrainingSource, Sequence[Union[str, os.PathLike, TrainingSource]]]


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith(_TEXT_SUFFIXES):
        return "text"
    return None


def _is_shard_dir(path: Path) -> bool:
    return path.is_dir() and (path / INDEX_FILE).is_file()


def _expand_dir(directory: Path) -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if _is_shard_dir(entry):
            found.append((entry, "shards"))
        elif entry.is_dir():
            found.extend(_expand_dir(entry))
        elif (kind := _format_of(entry)) is not None:
            found.append((entry, kind))
        else:
            logger.warning("contamination check: skipping %s (not text, JSONL, JSON or Parquet by its suffix)", entry)
    return found


def _resolve_sources(sources: Sources) -> list[tuple[Path, str]]:
    """(path, format) of every training file or shard directory, in a stable order."""
    if isinstance(sources, (str, os.PathLike, TrainingSource)):
        sources = [sources]
    items = list(sources)
    if not items:
        raise ConfigError("no training data given for the contamination check")
    resolved: list[tuple[Path, str]] = []
    for item in items:
        explicit = None
        if isinstance(item, TrainingSource):
            explicit, item = item.format, item.path
        if not isinstance(item, (str, os.PathLike)):
            raise ConfigError(f"a training source must be a path or TrainingSource, got {type(item).__name__}")
        path = Path(item)
        if explicit is not None:
            if not path.exists():
                raise DataError("no such file or directory", path)
            resolved.append((path, explicit))
        elif _is_shard_dir(path):
            resolved.append((path, "shards"))
        elif path.is_dir():
            found = _expand_dir(path)
            if not found:
                raise DataError("directory holds no text, JSONL, JSON, Parquet or token-shard data", path)
            resolved.extend(found)
        elif path.is_file():
            kind = _format_of(path)
            if kind is None:
                raise DataError(
                    "cannot tell the format from the suffix (.txt, .md, .jsonl, .jsonl.gz, .json, .parquet); "
                    "name it with TrainingSource(path, format=...)",
                    path,
                )
            resolved.append((path, kind))
        elif _GLOB_CHARS & set(str(item)):
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            found = [(p, "shards") if _is_shard_dir(p) else (p, _format_of(p)) for p in matches]
            found = [(p, kind) for p, kind in found if kind is not None and (kind == "shards" or p.is_file())]
            if not found:
                raise DataError("glob pattern matches no training data", item)
            resolved.extend(found)
        else:
            raise DataError("no such file or directory", path)
    return resolved


def _strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for inner in value.values():
            _strings(inner, out)
    elif isinstance(value, (list, tuple)):
        for inner in value:
            _strings(inner, out)


def _record_text(record: Any) -> str:
    parts: list[str] = []
    _strings(record, parts)
    return "\n".join(parts)


def _separates_with_end_of_text(path: Path) -> bool:
    """Whether the file separates documents with ``<|endoftext|>`` lines, judged from its first MiB."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    marker = _END_OF_TEXT_LINE.encode()
    return any(line.strip() == marker for line in head.splitlines())


def _iter_text(path: Path) -> Iterator[tuple[str, str, int]]:
    prefix = f"{path}:"
    # Files separated by <|endoftext|> lines have blank lines inside their documents (TinyStories' paragraphs).
    paragraphs = not _separates_with_end_of_text(path)
    lines: list[str] = []
    first = previous = size = 0
    # iter_jsonl_lines yields the non-blank lines with their numbers (strict UTF-8, errors name the line); a gap in
    # the numbering is a blank line.
    for lineno, line in iter_jsonl_lines(path):
        separator = line.strip() == _END_OF_TEXT_LINE
        blank_before = paragraphs and lineno != previous + 1
        if lines and (blank_before or separator or size >= _MAX_DOCUMENT_CHARS):
            yield "".join(lines), prefix, first
            lines, size = [], 0
        previous = lineno
        if separator:
            continue
        if not lines:
            first = lineno
        lines.append(line)
        size += len(line)
    if lines:
        yield "".join(lines), prefix, first


def _iter_jsonl(path: Path) -> Iterator[tuple[str, str, int]]:
    prefix = f"{path}:"
    for lineno, line in iter_jsonl_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path, lineno) from None
        yield _record_text(record), prefix, lineno


def _iter_json(path: Path) -> Iterator[tuple[str, str, int]]:
    prefix = f"{path}: record "
    for i, record in enumerate(read_json_records(path)):
        yield _record_text(record), prefix, i


def _holds_strings(pa: Any, kind: Any) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return True
    check_view = getattr(pa.types, "is_string_view", None)
    if check_view is not None and check_view(kind):
        return True
    return any(_holds_strings(pa, kind.field(i).type) for i in range(kind.num_fields))


def _iter_parquet(path: Path) -> Iterator[tuple[str, str, int]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ForgelineError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file: {e}", path) from None
    prefix = f"{path}: row "
    with parquet:
        schema = parquet.schema_arrow
        columns = [f.name for f in schema if _holds_strings(pa, f.type)]
        if not columns:
            raise DataError(f"Parquet file has no string columns (columns: {', '.join(schema.names) or 'none'})", path)
        row = 0
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                values = [column.to_pylist() for column in batch.columns]
                for cells in zip(*values):
                    yield _record_text(list(cells)), prefix, row
                    row += 1
        except UnicodeDecodeError:
            raise DataError(f"row {row}: a string column holds invalid UTF-8", path) from None
        except pa.ArrowException as e:
            raise DataError(f"cannot read Parquet data near row {row}: {e}", path) from None


def _shard_tokenizer(directory: Path, index: dict[str, Any], tokenizer: Any) -> Any:
    from ..tokenizer import Tokenizer

    if tokenizer is None:
        own = directory / TOKENIZER_DIR
        if not own.is_dir():
            raise DataError(
                f"token shards without their {TOKENIZER_DIR}/ copy; pass the tokenizer that prepared them", directory
            )
        tokenizer = Tokenizer.load(own)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.load(tokenizer)
    check_tokenizer(index, tokenizer)
    return tokenizer


def _iter_shards(directory: Path, tokenizer: Any) -> Iterator[tuple[str, str, int]]:
    index = load_index(directory)
    tokenizer = _shard_tokenizer(directory, index, tokenizer)
    dtype = token_dtype(int(index["vocab_size"]))
    eos = int(index["eos_id"])

    def decode(pieces: list[np.ndarray]) -> list[str]:
        # Special tokens (chat markers) are dropped: a benchmark item's text never contains them, and they would
        # otherwise become words in the middle of its n-grams.
        return tokenizer.backend.decode_batch([p.tolist() for p in pieces], skip_special_tokens=True)

    for split in ("train", "val"):
        prefix = f"{directory}: {split} document "
        number = 0
        carry: list[np.ndarray] = []  # the start of a document that continues in the next chunk or shard
        for shard in index["splits"][split]["shards"]:
            if int(shard["tokens"]) == 0:
                continue
            tokens = np.memmap(directory / shard["file"], dtype=dtype, mode="r")
            for start in range(0, len(tokens), _DECODE_CHUNK_TOKENS):
                chunk = np.asarray(tokens[start : start + _DECODE_CHUNK_TOKENS])
                ends = np.flatnonzero(chunk == eos)
                if ends.size == 0:
                    carry.append(chunk)
                    continue
                pieces = [np.concatenate([*carry, chunk[: ends[0]]])]
                pieces.extend(chunk[a + 1 : b] for a, b in zip(ends[:-1], ends[1:]))
                carry = [chunk[ends[-1] + 1 :]]
                for text in decode(pieces):
                    yield text, prefix, number
                    number += 1
            del tokens
        rest = np.concatenate(carry) if carry else np.empty(0, dtype=dtype)
        if rest.size:  # a stream that does not end in EOS: a document all the same
            yield decode([rest])[0], prefix, number


def _read_documents(path: Path, kind: str, tokenizer: Any) -> Iterator[tuple[str, str, int]]:
    """(text, source prefix, number) of every document; the source of a document is prefix + number."""
    if kind == "shards":
        return _iter_shards(path, tokenizer)
    if not path.is_file():
        raise DataError("no such file" if not path.exists() else "not a regular file", path)
    return {"text": _iter_text, "jsonl": _iter_jsonl, "json": _iter_json, "parquet": _iter_parquet}[kind](path)


class _SourceTable:
    """Where each document came from, at 12 bytes a document: the label is built only when a match is reported."""

    def __init__(self) -> None:
        self._prefixes: list[str] = []
        self._prefix_ids: dict[str, int] = {}
        self._doc_prefix = array("I")
        self._doc_number = array("q")

    def add(self, prefix: str, number: int | None) -> int:
        pid = self._prefix_ids.get(prefix)
        if pid is None:
            pid = self._prefix_ids[prefix] = len(self._prefixes)
            self._prefixes.append(prefix)
        self._doc_prefix.append(pid)
        self._doc_number.append(-1 if number is None else number)
        return len(self._doc_prefix) - 1

    def label(self, doc: int) -> str:
        number = self._doc_number[doc]
        prefix = self._prefixes[self._doc_prefix[doc]]
        return prefix if number < 0 else f"{prefix}{number}"


@dataclass
class IndexStats:
    """What building an index read and how long it took (wall time of the passes that built it)."""

    documents: int = 0
    words: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents' text (after decoding, for token shards)
    ngrams: int = 0  # n-gram positions hashed, all lengths (NgramIndex)
    windows: int = 0  # windows sketched (NearDuplicateIndex)
    seconds: float = 0.0

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def ngrams_per_second(self) -> float:
        return self.ngrams / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents, "words": self.words, "bytes": self.bytes, "ngrams": self.ngrams,
            "windows": self.windows, "seconds": round(self.seconds, 3),
            "megabytes_per_second": round(self.megabytes_per_second, 3),
            "ngrams_per_second": round(self.ngrams_per_second, 1),
        }


def _scan(sources: Sources, tokenizer: Any, sinks: Sequence[Any]) -> None:
    """Read every document once and hand its word hashes to every index in ``sinks`` (which share one table)."""
    started = time.perf_counter()
    table = sinks[0]._sources
    for path, kind in _resolve_sources(sources):
        found = False
        try:
            for text, prefix, number in _read_documents(path, kind, tokenizer):
                words = _words(text)
                if not words:
                    continue
                found = True
                doc = table.add(prefix, number)
                hashes = _word_hashes(words)
                nbytes = len(text.encode("utf-8"))
                for sink in sinks:
                    sink._add(hashes, doc, nbytes)
        except (OSError, EOFError) as e:  # unreadable file, corrupt or truncated gzip stream
            raise DataError(f"cannot read: {getattr(e, 'strerror', None) or e}", path) from None
        if not found:
            # An empty training file most likely means the wrong file, and checking against it would report every
            # item clean.
            raise DataError("holds no text to check against", path)
    for sink in sinks:
        sink._finish()
    elapsed = time.perf_counter() - started
    for sink in sinks:
        sink.stats.seconds += elapsed


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------- exact n-grams


class NgramIndex:
    """64-bit hashes of the training data's word n-grams, sorted for binary search (see the module docstring)."""

    def __init__(self, n: int = 13, *, short_lengths: Iterable[int] = (), track_sources: bool = True):
        self.n = _positive_int("n", n)
        short = {_positive_int("short_lengths entry", m) for m in short_lengths}
        if any(m >= self.n for m in short):
            raise ConfigError(f"short_lengths must be below n={self.n}, got {sorted(short)}")
        self.lengths = tuple(sorted(short | {self.n}))
        self.track_sources = bool(track_sources)
        self.stats = IndexStats()
        self._sources = _SourceTable()
        self._hashes = np.empty(0, dtype=np.uint64)
        self._docs = np.empty(0, dtype=np.uint64) if self.track_sources else None
        self._batch: list[np.ndarray] = []
        self._batch_docs: list[int] = []
        self._batch_words = 0
        self._pending_hashes: list[np.ndarray] = []
        self._pending_docs: list[np.ndarray] = []
        self._pending = 0

    @classmethod
    def build(
        cls,
        sources: Sources,
        *,
        n: int = 13,
        short_lengths: Iterable[int] = (),
        tokenizer: Any = None,
        track_sources: bool = True,
    ) -> NgramIndex:
        """Index every document of ``sources``; ``tokenizer`` decodes token shards (default: their own copy)."""
        index = cls(n, short_lengths=short_lengths, track_sources=track_sources)
        index.add_sources(sources, tokenizer=tokenizer)
        return index

    def add_sources(self, sources: Sources, *, tokenizer: Any = None) -> None:
        _scan(sources, tokenizer, [self])

    def add_text(self, text: str, source: str = "<text>") -> None:
        """Index one document given as text; ``source`` is what a match on it reports."""
        started = time.perf_counter()
        words = _words(text)
        if words:
            self._add(_word_hashes(words), self._sources.add(source, None), len(text.encode("utf-8")))
        self.stats.seconds += time.perf_counter() - started

    def overlap(self, text: str) -> tuple[float, int, int]:
        """(fraction, matched, total): how many of the text's n-gram positions occur in the index."""
        matched, total, _ = self._lookup(_word_hashes(_words(text)))
        return (matched / total if total else 0.0), matched, total

    def source_of(self, text: str) -> str | None:
        """The training document holding most of the text's matched n-grams (None without matches or sources)."""
        _, _, positions = self._lookup(_word_hashes(_words(text)))
        return self._source_at(positions)

    def __len__(self) -> int:
        self._finish()
        return len(self._hashes)

    @property
    def nbytes(self) -> int:
        self._finish()
        return self._hashes.nbytes + (0 if self._docs is None else self._docs.nbytes)

    # -- building --------------------------------------------------------------------------------------------------

    def _add(self, hashes: np.ndarray, doc: int, nbytes: int) -> None:
        self.stats.documents += 1
        self.stats.words += len(hashes)
        self.stats.bytes += nbytes
        if len(hashes) < self.lengths[0]:
            return
        self._batch.append(hashes)
        self._batch_docs.append(doc)
        self._batch_words += len(hashes)
        if self._batch_words >= _BATCH_WORDS:
            self._flush_batch()

    def _flush_batch(self) -> None:
        if not self._batch:
            return
        words = np.concatenate(self._batch)
        lengths = np.fromiter(map(len, self._batch), dtype=np.int64, count=len(self._batch))
        doc_end = np.repeat(np.cumsum(lengths), lengths)
        starts = np.arange(len(words))
        doc_of = np.repeat(np.asarray(self._batch_docs, dtype=np.uint64), lengths) if self.track_sources else None
        for m in self.lengths:
            grams = _gram_hashes(words, m)
            count = len(grams)
            if count == 0:
                continue
            # Hashed over the whole batch at once, so windows that run from one document into the next are dropped.
            inside = starts[:count] + m <= doc_end[:count]
            self._pending_hashes.append(grams[inside])
            if doc_of is not None:
                self._pending_docs.append(doc_of[:count][inside])
            kept = int(np.count_nonzero(inside))
            self._pending += kept
            self.stats.ngrams += kept
        self._batch, self._batch_docs, self._batch_words = [], [], 0
        if self._pending >= max(_MERGE_MIN, len(self._hashes) // 4):
            self._merge()

    def _merge(self) -> None:
        if not self._pending_hashes:
            return
        # np.unique's return_index is the first occurrence, so each hash keeps the earliest document holding it.
        fresh, first = np.unique(np.concatenate(self._pending_hashes), return_index=True)
        fresh_docs = np.concatenate(self._pending_docs)[first] if self._docs is not None else None
        self._pending_hashes, self._pending_docs, self._pending = [], [], 0
        if len(self._hashes):
            where = np.searchsorted(self._hashes, fresh)
            known = np.zeros(len(fresh), dtype=bool)
            inside = where < len(self._hashes)
            known[inside] = self._hashes[where[inside]] == fresh[inside]
            new = ~known
            self._hashes = np.insert(self._hashes, where[new], fresh[new])
            if self._docs is not None:
                self._docs = np.insert(self._docs, where[new], fresh_docs[new])
        else:
            self._hashes = fresh
            if self._docs is not None:
                self._docs = fresh_docs

    def _finish(self) -> None:
        self._flush_batch()
        self._merge()

    # -- querying --------------------------------------------------------------------------------------------------

    def _lookup(self, hashes: np.ndarray) -> tuple[int, int, np.ndarray]:
        """(matched, total, index positions of the matched n-grams) for a text's word hashes."""
        self._finish()
        m = min(self.n, len(hashes))
        if m == 0:
            return 0, 0, np.empty(0, dtype=np.int64)
        if m not in self.lengths:
            raise ConfigError(
                f"this index holds {self.n}-word n-grams, and a text of {m} words needs its {m}-grams too: "
                f"build it with short_lengths including {m}"
            )
        grams = _gram_hashes(hashes, m)
        where = np.searchsorted(self._hashes, grams)
        found = np.zeros(len(grams), dtype=bool)
        inside = where < len(self._hashes)
        found[inside] = self._hashes[where[inside]] == grams[inside]
        return int(np.count_nonzero(found)), len(grams), where[found]

    def _source_at(self, positions: np.ndarray) -> str | None:
        if self._docs is None or not len(positions):
            return None
        docs, counts = np.unique(self._docs[positions], return_counts=True)
        return self._sources.label(int(docs[np.argmax(counts)]))


# --------------------------------------------------------------------------------------------- near duplicates


def _datasketch() -> tuple[Any, Any]:
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError:
        raise ForgelineError(
            "the near-duplicate (fuzzy) contamination check needs datasketch, part of the eval extra: "
            "pip install 'forgeline[eval]' (or turn the fuzzy check off and keep the exact n-gram check)"
        ) from None
    return MinHash, MinHashLSH


@dataclass(frozen=True)
class NearDuplicate:
    jaccard: float  # estimated from the two MinHash signatures
    source: str  # the training document, with the word range when it was cut into windows


class NearDuplicateIndex:
    """MinHash LSH over word shingles of training-document windows (see the module docstring)."""

    def __init__(self, *, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5, window: int = 200):
        self._MinHash, MinHashLSH = _datasketch()
        self.threshold = _fraction("jaccard threshold", threshold)
        self.num_perm = _positive_int("num_perm", num_perm, minimum=2)
        self.shingle = _positive_int("shingle", shingle)
        self.window = _positive_int("window", window)
        if self.window < self.shingle:
            raise ConfigError(f"window ({window} words) must hold at least one shingle ({shingle} words)")
        try:
            # Weighted for recall: every candidate is verified against its signature afterwards, so a false
            # positive of the bands costs a comparison, while a false negative is a contaminated item reported clean.
            self._lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm, weights=_LSH_WEIGHTS)
        except ValueError as e:
            raise ConfigError(f"no MinHash LSH for jaccard={threshold}, num_perm={num_perm}: {e}") from None
        # Shared by every signature: generating 2 x num_perm random parameters per window would cost more than
        # the hashing itself.
        self._permutations = self._MinHash(num_perm=self.num_perm, seed=_MINHASH_SEED).permutations
        self.stats = IndexStats()
        self._sources = _SourceTable()
        self._signatures = np.empty((1024, self.num_perm), dtype=np.uint32)
        self._window_doc = array("Q")
        self._window_span = array("q")  # start and end word of each window, -1 -1 for a whole document

    @classmethod
    def build(
        cls,
        sources: Sources,
        *,
        threshold: float = 0.8,
        num_perm: int = 128,
        shingle: int = 5,
        window: int = 200,
        tokenizer: Any = None,
    ) -> NearDuplicateIndex:
        index = cls(threshold=threshold, num_perm=num_perm, shingle=shingle, window=window)
        index.add_sources(sources, tokenizer=tokenizer)
        return index

    def add_sources(self, sources: Sources, *, tokenizer: Any = None) -> None:
        _scan(sources, tokenizer, [self])

    def add_text(self, text: str, source: str = "<text>") -> None:
        started = time.perf_counter()
        words = _words(text)
        if words:
            self._add(_word_hashes(words), self._sources.add(source, None), len(text.encode("utf-8")))
        self.stats.seconds += time.perf_counter() - started

    def query(self, text: str) -> list[NearDuplicate]:
        """Training windows whose estimated Jaccard similarity to ``text`` reaches the threshold, best first."""
        return self._query(_word_hashes(_words(text)))

    def __len__(self) -> int:
        return len(self._window_doc)

    # -- internals -------------------------------------------------------------------------------------------------

    def _shingles(self, hashes: np.ndarray) -> tuple[np.ndarray, int]:
        # A text shorter than a shingle is one shingle of all its words.
        k = min(self.shingle, len(hashes))
        grams = _gram_hashes(hashes, k)
        # datasketch's default scheme permutes 32-bit input hashes; fold the 64 bits rather than drop half of them.
        return ((grams ^ (grams >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32), k

    def _signature(self, shingles: np.ndarray) -> Any:
        minhash = self._MinHash(
            num_perm=self.num_perm, seed=_MINHASH_SEED, hashfunc=int, permutations=self._permutations,
            scheme="affine32",
        )
        minhash.update_batch(shingles.tolist())
        return minhash

    def _spans(self, length: int, stride: int) -> list[tuple[int, int]]:
        if length <= self.window:
            return [(0, length)]
        starts = list(range(0, length - self.window, stride))
        starts.append(length - self.window)  # the tail gets a full-size window of its own
        return [(s, s + self.window) for s in starts]

    def _add(self, hashes: np.ndarray, doc: int, nbytes: int) -> None:
        self.stats.documents += 1
        self.stats.words += len(hashes)
        self.stats.bytes += nbytes
        shingles, k = self._shingles(hashes)
        whole = len(hashes) <= self.window
        for start, end in self._spans(len(hashes), max(1, self.window // 2)):
            minhash = self._signature(shingles[start : end - k + 1])
            key = len(self._window_doc)
            if key == len(self._signatures):
                grown = np.empty((2 * key, self.num_perm), dtype=np.uint32)
                grown[:key] = self._signatures
                self._signatures = grown
            self._signatures[key] = minhash.hashvalues
            self._window_doc.append(doc)
            self._window_span.extend((-1, -1) if whole else (start, end))
            self._lsh.insert(key, minhash, check_duplication=False)
            self.stats.windows += 1

    def _finish(self) -> None:
        """Nothing is buffered: each window goes into the LSH tables as it is sketched."""

    def _label(self, key: int) -> str:
        label = self._sources.label(self._window_doc[key])
        start, end = self._window_span[2 * key], self._window_span[2 * key + 1]
        return label if start < 0 else f"{label} (words {start}-{end})"

    def _query(self, hashes: np.ndarray) -> list[NearDuplicate]:
        if len(hashes) == 0 or len(self._window_doc) == 0:
            return []
        shingles, k = self._shingles(hashes)
        best: dict[int, float] = {}
        # Windows of a long item slide by a tenth of a window, so one of them lines up with any training window to
        # within 5% of its length.
        for start, end in self._spans(len(hashes), max(1, self.window // 10)):
            minhash = self._signature(shingles[start : end - k + 1])
            candidates = self._lsh.query(minhash)
            if not candidates:
                continue
            keys = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
            estimates = (self._signatures[keys] == minhash.hashvalues).mean(axis=1)
            for key, estimate in zip(keys.tolist(), estimates.tolist()):
                if estimate >= self.threshold and estimate > best.get(key, -1.0):
                    best[key] = estimate
        ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))
        return [NearDuplicate(jaccard=jaccard, source=self._label(key)) for key, jaccard in ranked]


# ---------------------------------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class BenchmarkItem:
    task: str
    item_id: str
    text: str  # what a model would see: question plus answer choices or reference answer


@dataclass(frozen=True)
class FlaggedItem:
    task: str
    item_id: str
    overlap: float  # fraction of the item's n-grams found in the training data
    matched: int  # how many of its n-grams were found
    ngrams: int  # how many n-grams it has
    exact: bool  # overlap >= threshold
    jaccard: float | None  # best near-duplicate's estimated Jaccard similarity, None when none reached the threshold
    fuzzy: bool
    source: str | None  # the training document: the exact match's, else the near duplicate's

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "item_id": self.item_id, "overlap": round(self.overlap, 4), "matched": self.matched,
            "ngrams": self.ngrams, "exact": self.exact,
            "jaccard": None if self.jaccard is None else round(self.jaccard, 4), "fuzzy": self.fuzzy,
            "source": self.source,
        }


@dataclass(frozen=True)
class TaskSummary:
    items: int
    exact: int  # flagged by the n-gram overlap
    fuzzy: int  # flagged as near duplicates
    either: int

    @property
    def clean(self) -> int:
        return self.items - self.either

    def to_dict(self) -> dict[str, int]:
        return {"items": self.items, "flagged_exact": self.exact, "flagged_fuzzy": self.fuzzy,
                "flagged_either": self.either, "clean": self.clean}


@dataclass
class ContaminationReport:
    settings: dict[str, Any]
    tasks: dict[str, TaskSummary]
    flagged: list[FlaggedItem]
    index: dict[str, Any] = field(default_factory=dict)  # IndexStats.to_dict() of the indexes, by kind
    _item_ids: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def flagged_ids(self, task: str) -> set[str]:
        self._check_task(task)
        return {f.item_id for f in self.flagged if f.task == task}

    def clean_ids(self, task: str) -> set[str]:
        """The task's items that neither check flagged, for a score on the clean subset beside the full one."""
        return set(self._item_ids[self._check_task(task)]) - self.flagged_ids(task)

    def _check_task(self, task: str) -> str:
        if task not in self.tasks:
            raise KeyError(f"no task {task!r} in this contamination report (tasks: {', '.join(self.tasks) or 'none'})")
        return task

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dict(self.settings),
            "tasks": {task: summary.to_dict() for task, summary in self.tasks.items()},
            "flagged": [f.to_dict() for f in self.flagged],
            "index": dict(self.index),
        }

    def to_markdown(self) -> str:
        s = self.settings
        lines = [
            f"Contamination: an item is flagged when >= {s['threshold']:g} of its {s['n']}-grams occur in the "
            "training data"
            + (
                f", or a training document is a near duplicate (MinHash Jaccard >= {s['jaccard']:g} over word "
                f"{s['shingle']}-grams)."
                if s.get("fuzzy")
                else "."
            ),
            "",
            "| task | items | flagged exact | flagged fuzzy | flagged either | clean |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for task, t in self.tasks.items():
            lines.append(f"| {_cell(task)} | {t.items} | {t.exact} | {t.fuzzy} | {t.either} | {t.clean} |")
        lines.append("")
        if not self.flagged:
            lines.append("No item was flagged.")
            return "\n".join(lines) + "\n"
        lines += [
            "| task | item | overlap | matched n-grams | Jaccard | source |",
            "|---|---|---:|---:|---:|---|",
        ]
        for f in self.flagged:
            jaccard = "" if f.jaccard is None else f"{f.jaccard:.2f}"
            lines.append(
                f"| {_cell(f.task)} | {_cell(f.item_id)} | {f.overlap:.2f} | {f.matched}/{f.ngrams} | {jaccard} | "
                f"{_cell(f.source or '')} |"
            )
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _check_item_list(items: Iterable[BenchmarkItem]) -> list[BenchmarkItem]:
    items = list(items)
    seen: set[tuple[str, str]] = set()
    for item in items:
        if not isinstance(item, BenchmarkItem):
            raise ConfigError(f"benchmark items must be BenchmarkItem, got {type(item).__name__}")
        key = (item.task, item.item_id)
        if key in seen:
            raise ConfigError(f"task {item.task!r} has two items with id {item.item_id!r}")
        seen.add(key)
    return items


def check_items(
    items: Iterable[BenchmarkItem],
    ngram_index: NgramIndex,
    near_index: NearDuplicateIndex | None = None,
    *,
    threshold: float = 0.5,
) -> ContaminationReport:
    """Check items against indexes built beforehand (to check several benchmarks against one build)."""
    items = _check_item_list(items)
    threshold = _fraction("threshold", threshold)
    tasks: dict[str, list[int]] = {}
    ids: dict[str, list[str]] = {}
    flagged: list[FlaggedItem] = []
    for item in items:
        counts = tasks.setdefault(item.task, [0, 0, 0, 0])
        ids.setdefault(item.task, []).append(item.item_id)
        counts[0] += 1
        hashes = _word_hashes(_words(item.text))
        matched, total, positions = ngram_index._lookup(hashes)
        overlap = matched / total if total else 0.0
        exact = total > 0 and overlap >= threshold
        near = near_index._query(hashes) if near_index is not None else []
        if not (exact or near):
            continue
        source = ngram_index._source_at(positions) if exact else None
        if source is None and near:
            source = near[0].source
        counts[1] += exact
        counts[2] += bool(near)
        counts[3] += 1
        flagged.append(FlaggedItem(
            task=item.task, item_id=item.item_id, overlap=overlap, matched=matched, ngrams=total, exact=exact,
            jaccard=near[0].jaccard if near else None, fuzzy=bool(near), source=source,
        ))
    settings: dict[str, Any] = {"n": ngram_index.n, "threshold": threshold, "fuzzy": near_index is not None}
    index = {
        "ngrams": {**ngram_index.stats.to_dict(), "distinct": len(ngram_index), "bytes_in_memory": ngram_index.nbytes}
    }
    if near_index is not None:
        settings.update(jaccard=near_index.threshold, num_perm=near_index.num_perm, shingle=near_index.shingle,
                        window=near_index.window)
        index["near_duplicates"] = near_index.stats.to_dict()
    return ContaminationReport(
        settings=settings,
        tasks={task: TaskSummary(*counts) for task, counts in tasks.items()},
        flagged=flagged,
        index=index,
        _item_ids=ids,
    )


def check_contamination(
    items: Iterable[BenchmarkItem],
    sources: Sources,
    *,
    n: int = 13,
    threshold: float = 0.5,
    fuzzy: bool = True,
    jaccard: float = 0.8,
    num_perm: int = 128,
    shingle: int = 5,
    window: int = 200,
    tokenizer: Any = None,
) -> ContaminationReport:
    """Flag the benchmark items found in the training data ``sources``, reading the data once for both checks."""
    items = _check_item_list(items)
    threshold = _fraction("threshold", threshold)
    n = _positive_int("n", n)
    short = {len(words) for words in (_words(item.text) for item in items) if 0 < len(words) < n}
    exact = NgramIndex(n, short_lengths=short)
    sinks: list[Any] = [exact]
    near = None
    if fuzzy:
        near = NearDuplicateIndex(threshold=jaccard, num_perm=num_perm, shingle=shingle, window=window)
        near._sources = exact._sources  # one table, so a document id means the same document to both
        sinks.append(near)
    _scan(sources, tokenizer, sinks)
    return check_items(items, exact, near, threshold=threshold)
