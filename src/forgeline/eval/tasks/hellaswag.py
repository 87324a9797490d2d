"""HellaSwag, lm-evaluation-harness's `hellaswag`: the context is "{activity_label}: {ctx_a} {Ctx_b}" and each
ending a continuation, all through the harness's preprocessing (" [title]" becomes ". ", other [bracketed] tags go,
double spaces become one)."""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import DataError
from . import Doc, MultipleChoiceTask
from ._files import field, jsonl_records


def preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(MultipleChoiceTask):
    name = "hellaswag"
    version = 1
    default_path = "hellaswag/hellaswag_train.first3368.jsonl"

    def read(self, path: Path) -> list[Doc]:
        docs = []
        for line, record in jsonl_records(path):
            ctx_b = field(record, "ctx_b", str, path, line)
            ctx = field(record, "ctx_a", str, path, line) + " " + ctx_b.capitalize()
            query = preprocess(field(record, "activity_label", str, path, line) + ": " + ctx)
            endings = field(record, "endings", list, path, line)
            label = record.get("label")
            try:
                gold = int(label)
            except (TypeError, ValueError):
                raise DataError(f"label must be an integer index, got {label!r}", path, line) from None
            if not 0 <= gold < len(endings):
                raise DataError(f"label {gold} is outside the {len(endings)} endings", path, line)
            docs.append(Doc(id=str(record.get("ind", line)), fields={"query": query},
                            choices=[preprocess(str(e)) for e in endings], gold=gold))
        return docs

    def text(self, doc: Doc) -> str:
        return doc.fields["query"]
