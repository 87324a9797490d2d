"""GSM8K (Cobbe et al.), lm-evaluation-harness's `gsm8k` and `gsm8k_cot`: "Question: {question}\nAnswer:" with
few-shot examples, greedy generation until "Question:" (or the end of a turn), then exact match of the final number
after the harness's normalisation:
* strict-match: the number after "#### " (the dataset's answer format);
* flexible-extract: the last number in the text.
`gsm8k_cot` is the 8-shot chain-of-thought variant: "Q: {question}\nA:" after the eight worked examples of Wei et
al. 2022 (data/gsm8k_cot_exemplars.jsonl, always the same eight in the same order), greedy until "Q:"; strict-match
reads the number in "The answer is N.", flexible-extract the last number."""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import DataError
from . import Doc, GenerationTask
from ._files import field, jsonl_records

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
COT_ANSWER = re.compile(r"The answer is (\-?[0-9\.\,]+).")
IGNORE = [re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$")]


def normalise(text: str) -> str:
    for pattern in IGNORE:
        text = pattern.sub("", text)
    return text.strip()


def strict_answer(text: str) -> str | None:
    match = STRICT.search(text)
    return match.group(1) if match else None


def flexible_answer(text: str) -> str | None:
    matches = FLEXIBLE.findall(text)
    if not matches:
        return None
    last = matches[-1]
    return (last[0] or last[1]) if isinstance(last, tuple) else last


class GSM8K(GenerationTask):
    name = "gsm8k"
    version = 1
    default_path = "gsm8k/train.jsonl"
    num_fewshot = 5
    until = ("Question:", "</s>", "<|im_end|>")
    max_new_tokens = 256
    metrics = ("exact_match_strict", "exact_match_flexible")

    def read(self, path: Path) -> list[Doc]:
        docs = []
        for line, record in jsonl_records(path):
            answer = field(record, "answer", str, path, line)
            if strict_answer(answer) is None:
                raise DataError("the answer has no '#### N' final line", path, line)
            docs.append(Doc(id=str(line), fields={"question": field(record, "question", str, path, line),
                                                  "answer": answer}))
        return docs

    def text(self, doc: Doc) -> str:
        return f"Question: {doc.fields['question']}\nAnswer:"

    def target(self, doc: Doc) -> str:
        return doc.fields["answer"]

    def reference(self, doc: Doc) -> str:
        return normalise(strict_answer(doc.fields["answer"]) or "")

    def extract(self, text: str) -> dict[str, str | None]:
        return {"strict": strict_answer(text), "flexible": flexible_answer(text)}

    def score(self, doc: Doc, text: str) -> dict[str, float]:
        gold = self.reference(doc)
        got = self.extract(text)
        return {"exact_match_strict": float(got["strict"] is not None and normalise(got["strict"]) == gold),
                "exact_match_flexible": float(got["flexible"] is not None and normalise(got["flexible"]) == gold)}


class GSM8KChainOfThought(GSM8K):
    name = "gsm8k_cot"
    version = 1
    num_fewshot = 8
    fewshot_sampler = "first_n"
    until = ("Q:", "</s>", "<|im_end|>")

    def __init__(self, path=None, **kwargs):
        super().__init__(path, **kwargs)
        exemplars = Path(__file__).with_name("data") / "gsm8k_cot_exemplars.jsonl"
        self.exemplars = [Doc(id=f"exemplar-{line}", fields={"question": field(r, "question", str, exemplars, line),
                                                              "answer": field(r, "answer", str, exemplars, line)})
                          for line, r in jsonl_records(exemplars)]
        if self.num_fewshot > len(self.exemplars):
            raise DataError(f"gsm8k_cot has {len(self.exemplars)} worked examples; {self.num_fewshot} asked for",
                            exemplars, None)

    def group_pool(self, doc: Doc, pool: list[Doc]) -> list[Doc]:
        return self.exemplars

    def text(self, doc: Doc) -> str:
        return f"Q: {doc.fields['question']}\nA:"

    def extract(self, text: str) -> dict[str, str | None]:
        match = COT_ANSWER.search(text)
        return {"strict": match.group(1) if match else None, "flexible": flexible_answer(text)}
