"""Synthetic arithmetic (`forgeline data synthetic --kind rl --split test`): "What is 37 + 48?" answered greedily;
exact match of the integer the answer starts with (`data.synthetic.answer_of`, the RL reward's reading). No file
ships with it: pass the held-out questions with `--data arithmetic=PATH`."""

from __future__ import annotations

from pathlib import Path

from ...data.synthetic import answer_of
from ...errors import DataError
from . import Doc, GenerationTask
from ._files import field, jsonl_records


class Arithmetic(GenerationTask):
    name = "arithmetic"
    version = 1
    default_path = "arithmetic/test.jsonl"
    until = ("\n",)
    max_new_tokens = 12
    metrics = ("exact_match",)

    def read(self, path: Path) -> list[Doc]:
        docs = []
        for line, record in jsonl_records(path):
            answer = field(record, "answer", str, path, line)
            if answer_of(answer) != answer:
                raise DataError(f"answer {answer!r} is not a plain integer", path, line)
            docs.append(Doc(id=str(line), fields={"question": field(record, "prompt", str, path, line),
                                                  "answer": answer}))
        return docs

    def text(self, doc: Doc) -> str:
        return doc.fields["question"]

    def target(self, doc: Doc) -> str:
        return doc.fields["answer"]

    def extract(self, text: str) -> dict[str, str | None]:
        return {"answer": answer_of(text)}

    def score(self, doc: Doc, text: str) -> dict[str, float]:
        return {"exact_match": float(answer_of(text) == doc.fields["answer"])}
