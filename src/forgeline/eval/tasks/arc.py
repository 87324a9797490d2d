"""ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge), lm-evaluation-harness's `arc_easy` / `arc_challenge`:
"Question: {question}\nAnswer:" with each answer text as a continuation; 3-5 choices labelled A-E or 1-5."""

from __future__ import annotations

from pathlib import Path

from ...errors import DataError
from . import Doc, MultipleChoiceTask
from ._files import field, jsonl_records


class _Arc(MultipleChoiceTask):
    version = 1

    def read(self, path: Path) -> list[Doc]:
        docs = []
        for line, record in jsonl_records(path):
            question = field(record, "question", dict, path, line)
            stem = field(question, "stem", str, path, line)
            choices = field(question, "choices", list, path, line)
            answer = field(record, "answerKey", str, path, line)
            labels = [field(c, "label", str, path, line) for c in choices]
            texts = [field(c, "text", str, path, line) for c in choices]
            if answer not in labels:
                raise DataError(f"answerKey {answer!r} is not one of the labels {labels}", path, line)
            docs.append(Doc(id=str(record.get("id", line)), fields={"question": stem}, choices=texts,
                            gold=labels.index(answer)))
        return docs

    def text(self, doc: Doc) -> str:
        return f"Question: {doc.fields['question']}\nAnswer:"


class ArcEasy(_Arc):
    name = "arc_easy"
    default_path = "arc/ARC-Easy/ARC-Easy-Dev.jsonl"


class ArcChallenge(_Arc):
    name = "arc_challenge"
    default_path = "arc/ARC-Challenge/ARC-Challenge-Dev.jsonl"
