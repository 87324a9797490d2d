"""Documents out of raw files: plain text, JSONL, JSON and Parquet, one document (a ``str``) at a time.

The one reader of raw text: ``forgeline data prepare`` and ``forgeline tokenizer train`` both read through it, so a
tokenizer is trained on exactly the documents it will encode, and every format and error is the same for both.

Formats, chosen by extension (a trailing ``.gz`` is decompressed on the fly for the text formats):

* ``.jsonl`` / ``.ndjson``: one JSON object per line, the text under ``text_field``; blank lines are skipped.
* ``.json``: a top-level array of objects, or an object holding exactly one such array (``{"data": [...]}``).
  JSON cannot be streamed without a parser dependency, so a ``.json`` file is read whole; use JSONL for big data.
* ``.parquet``: the ``text_field`` column, read one record batch at a time with pyarrow.
* anything else: plain text, streamed in chunks and split into documents on ``text_separator`` (``"\\n\\n"`` for
  paragraphs, ``"<|endoftext|>"`` for TinyStories-style files). Line endings are normalized to ``\\n`` first, so a
  ``"\\n\\n"`` separator also splits Windows files. Line breaks around a document belong to the separator and are
  trimmed; other whitespace (indentation) is kept.

Every format drops documents that are empty or whitespace-only, because each one would become a lone EOS.

UTF-8 policy: strict. The first invalid byte sequence is a :class:`~forgeline.errors.DataError` naming the file and
the line (the row or record for Parquet and JSON); nothing is silently replaced, because a replacement character
would become a token the model learns as if it were text. A leading UTF-8 byte-order mark is ignored.

Every other user mistake (missing path, empty file, malformed JSON line, missing or non-string field, a Parquet
file without the column) is a ``DataError`` naming the file, and the line where there is one.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Union

from forgeline.errors import ConfigError, DataError

__all__ = ["iter_documents", "iter_file_documents", "resolve_inputs"]

PathLike = Union[str, os.PathLike]
Inputs = Union[PathLike, Sequence[PathLike]]

_CHUNK_CHARS = 1 << 20
_PARQUET_BATCH_ROWS = 4096
_GLOB_CHARS = frozenset("*?[")


def resolve_inputs(inputs: Inputs) -> list[Path]:
    """Expand files, directories (recursively, hidden files skipped) and glob patterns into a list of files.

    Directory and glob expansions are sorted so that the same inputs always give the same document order, which the
    token shards (and therefore training) depend on. Explicitly listed files keep the caller's order.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise ConfigError("no input files given")
    files: list[Path] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise ConfigError(f"an input must be a path or glob pattern, got {type(item).__name__}")
        path = Path(item)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError("input directory holds no files", path)
            files.extend(found)
        elif _GLOB_CHARS & set(str(item)):
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file())
            if not found:
                raise DataError("glob pattern matches no files", item)
            files.extend(found)
        else:
            raise DataError("no such file or directory", path)
    return files


def iter_documents(inputs: Inputs, *, text_field: str = "text", text_separator: str = "\n\n") -> Iterator[str]:
    """Yield every document of every input file (see the module docstring for formats and errors)."""
    _check_options(text_field, text_separator)
    for path in resolve_inputs(inputs):
        yield from iter_file_documents(path, text_field=text_field, text_separator=text_separator)


def iter_file_documents(path: PathLike, *, text_field: str = "text", text_separator: str = "\n\n") -> Iterator[str]:
    """Yield the documents of one file; a file that yields none is an error (it is almost always a mistake)."""
    _check_options(text_field, text_separator)
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file" if not path.exists() else "not a regular file", path)
    if path.stat().st_size == 0:
        raise DataError("file is empty", path)
    kind = _format_of(path)
    if kind == "parquet":
        docs = _iter_parquet(path, text_field)
    elif kind == "jsonl":
        docs = _iter_jsonl(path, text_field)
    elif kind == "json":
        docs = _iter_json(path, text_field)
    else:
        docs = _iter_text(path, text_separator)
    produced = False
    try:
        for doc in docs:
            if doc and not doc.isspace():
                produced = True
                yield doc
    except (OSError, EOFError) as e:  # unreadable file, corrupt or truncated gzip stream
        raise DataError(f"cannot read: {getattr(e, 'strerror', None) or e}", path) from None
    if not produced:
        raise DataError("file holds no documents (only empty or whitespace-only text)", path)


def _check_options(text_field: Any, text_separator: Any) -> None:
    if not isinstance(text_field, str) or not text_field:
        raise ConfigError(f"text_field must be a non-empty string, got {text_field!r}")
    if not isinstance(text_separator, str) or not text_separator:
        raise ConfigError(f"text_separator must be a non-empty string, got {text_separator!r}")


def _format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
        if name.endswith(".parquet"):
            raise DataError("a gzipped Parquet file is not supported (Parquet compresses internally)", path)
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    return "text"


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _utf8_error(path: Path) -> DataError:
    """Locate the first invalid UTF-8 sequence of a file by a second, byte-level pass (errors are rare, so the fast
    path does not pay for line counting)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    newlines = 0
    with _open_binary(path) as f:
        while True:
            chunk = f.read(_CHUNK_CHARS)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # e.object is the decoder's pending bytes (never a newline) followed by this chunk.
                line = newlines + e.object[: e.start].count(b"\n") + 1
                bad = e.object[e.start : e.start + 1]
                what = f"byte {bad!r}" if bad else "a multi-byte sequence cut off at the end of the file"
                return DataError(
                    f"invalid UTF-8 ({what}); forgeline reads text as strict UTF-8, re-encode the file", path, line
                )
            if not chunk:
                break
            newlines += chunk.count(b"\n")
    return DataError("invalid UTF-8", path)


def _iter_text(path: Path, separator: str) -> Iterator[str]:
    """Stream a text file and split it on ``separator`` without ever holding more than one document plus a chunk.

    Pieces of a document that spans many chunks are collected in a list and joined once, so a huge document costs
    linear, not quadratic, time.
    """
    parts: list[str] = []  # the unfinished document, in pieces
    tail = ""  # its last len(separator) - 1 characters: a separator may straddle two chunks
    keep = len(separator) - 1
    try:
        with _open_binary(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline=None) as f:
            while chunk := f.read(_CHUNK_CHARS):
                if separator not in tail + chunk:
                    parts.append(chunk)
                    tail = (tail + chunk)[-keep:] if keep else ""
                    continue
                pieces = ("".join(parts) + chunk).split(separator)
                for doc in pieces[:-1]:
                    yield doc.strip("\n")
                parts = [pieces[-1]]
                tail = pieces[-1][-keep:] if keep else ""
    except UnicodeDecodeError:
        raise _utf8_error(path) from None
    for doc in "".join(parts).split(separator):
        yield doc.strip("\n")


def iter_jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line of a JSONL file (plain or .gz), decoded as strict UTF-8: the
    first bad byte is an error naming the file, line and column."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"invalid UTF-8 (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}); "
                    "forgeline reads text as strict UTF-8, re-encode the file",
                    path,
                    lineno,
                ) from None
            if line.strip():
                yield lineno, line


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in iter_jsonl_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path, lineno) from None
        yield _record_text(record, text_field, path, lineno, where="")


def read_json_records(path: Path) -> list:
    """The records of a JSON file: a top-level array, or an object holding exactly one array (as some exports
    wrap it), decoded as strict UTF-8."""
    with _open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _utf8_error(path) from None
    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path, e.lineno) from None
    if isinstance(top, dict):
        arrays = [key for key, value in top.items() if isinstance(value, list)]
        if len(arrays) != 1:
            keys = ", ".join(repr(k) for k in list(top)[:10]) or "none"
            raise DataError(
                f"expected a top-level array of objects, or an object holding exactly one array; "
                f"found an object with keys {keys}",
                path,
            )
        return top[arrays[0]]
    if not isinstance(top, list):
        raise DataError(f"expected a top-level array of objects, got {type(top).__name__}", path)
    return top


def _iter_json(path: Path, text_field: str) -> Iterator[str]:
    for i, record in enumerate(read_json_records(path)):
        yield _record_text(record, text_field, path, None, where=f"record {i}: ")


def _record_text(record: Any, text_field: str, path: Path, line: int | None, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}expected a JSON object, got {type(record).__name__}", path, line)
    if text_field not in record:
        fields = ", ".join(repr(k) for k in list(record)[:10]) or "none"
        raise DataError(
            f"{where}missing field {text_field!r} (fields present: {fields}); choose another with text_field",
            path,
            line,
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}field {text_field!r} must be a string, got {type(text).__name__}", path, line)
    return text


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file: {e}", path) from None
    with parquet:
        schema = parquet.schema_arrow
        if text_field not in schema.names:
            columns = ", ".join(repr(n) for n in schema.names) or "none"
            raise DataError(
                f"Parquet file has no column {text_field!r} (columns: {columns}); choose another with text_field", path
            )
        kind = schema.field(text_field).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or _is_string_view(pa, kind)):
            raise DataError(f"Parquet column {text_field!r} has type {kind}, expected a string column", path)
        row = 0
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
                for text in batch.column(0).to_pylist():
                    if text is None:
                        raise DataError(f"row {row}: column {text_field!r} is null", path)
                    row += 1
                    yield text
        except UnicodeDecodeError:
            raise DataError(
                f"row {row}: column {text_field!r} holds invalid UTF-8; forgeline reads text as strict UTF-8", path
            ) from None
        except pa.ArrowException as e:
            raise DataError(f"cannot read Parquet data near row {row}: {e}", path) from None


def _is_string_view(pa: Any, kind: Any) -> bool:
    check = getattr(pa.types, "is_string_view", None)
    return bool(check and check(kind))
