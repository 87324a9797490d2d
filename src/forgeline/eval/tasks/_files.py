"""Reading benchmark files with errors that name the file and line (data/sources.py's readers)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...data.sources import iter_jsonl_lines, read_json_records
from ...errors import DataError

__all__ = ["field", "jsonl_records", "csv_rows", "json_records"]


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, line in iter_jsonl_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path, lineno) from None
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}", path, lineno)
        yield lineno, record


def json_records(path: Path) -> list[Any]:
    return read_json_records(path)


def csv_rows(path: Path, *, header: bool) -> Iterator[tuple[int, list[str]]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 at byte {e.start}; re-encode the file", path) from None
    reader = csv.reader(io.StringIO(text))
    try:
        for i, row in enumerate(reader):
            if header and i == 0:
                continue
            if row:
                yield reader.line_num, row
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e}", path, reader.line_num) from None


def field(record: dict, key: str, kind: type | tuple, path: Path, line: int | str) -> Any:
    if key not in record:
        raise DataError(f"missing field {key!r}", path, line)
    value = record[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"field {key!r} must be {names}, got {type(value).__name__}", path, line)
    return value
