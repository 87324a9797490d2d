"""MMLU (Hendrycks et al.), lm-evaluation-harness's `mmlu`: 57 subjects, each a headerless CSV per split
(question, four options, answer letter); 5-shot from the subject's dev split in file order; continuations " A" to
" D"; acc. The headline is the micro average over all questions; the macro average over subjects and the four
categories' averages come with it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import ConfigError, DataError
from . import Doc, MultipleChoiceTask
from ._files import csv_rows

LETTERS = ["A", "B", "C", "D"]

CATEGORY = {
    **dict.fromkeys(["abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
                     "college_computer_science", "college_mathematics", "college_physics", "computer_security",
                     "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
                     "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
                     "high_school_physics", "high_school_statistics", "machine_learning"], "stem"),
    **dict.fromkeys(["formal_logic", "high_school_european_history", "high_school_us_history",
                     "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                     "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                     "world_religions"], "humanities"),
    **dict.fromkeys(["econometrics", "high_school_geography", "high_school_government_and_politics",
                     "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                     "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                     "sociology", "us_foreign_policy"], "social_sciences"),
    **dict.fromkeys(["business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
                     "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
                     "professional_accounting", "professional_medicine", "virology"], "other"),
}


class MMLU(MultipleChoiceTask):
    name = "mmlu"
    version = 1
    default_path = "mmlu"
    num_fewshot = 5
    fewshot_sampler = "first_n"
    metrics = ("acc",)

    def __init__(self, path=None, *, num_fewshot=None, seed=1234, split: str = "val",
                 subjects: Sequence[str] | None = None):
        super().__init__(path, num_fewshot=num_fewshot, seed=seed)
        unknown = sorted(set(subjects or ()) - set(CATEGORY))
        if unknown:
            raise ConfigError(f"mmlu: unknown subjects {unknown}; see forgeline.eval.tasks.mmlu.CATEGORY")
        self.split = split
        self.subjects = list(subjects) if subjects else sorted(CATEGORY)
        self._dev: dict[str, list[Doc]] = {}

    def _read_split(self, subject: str, split: str) -> list[Doc]:
        path = self.path / split / f"{subject}_{split}.csv"
        if not path.exists():
            raise ConfigError(f"mmlu: {path} does not exist (the hendrycks layout: {{dev,val,test}}/"
                              f"SUBJECT_SPLIT.csv)")
        docs = []
        for line, row in csv_rows(path, header=False):
            if len(row) != 6:
                raise DataError(f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}", path, line)
            if row[5].strip() not in LETTERS:
                raise DataError(f"answer must be one of A-D, got {row[5]!r}", path, line)
            docs.append(Doc(id=f"{subject}/{split}/{line}", fields={"question": row[0], "options": row[1:5]},
                            choices=list(LETTERS), gold=LETTERS.index(row[5].strip()), group=subject))
        return docs

    def read(self, path: Path) -> list[Doc]:
        docs = []
        for subject in self.subjects:
            docs += self._read_split(subject, self.split)
            self._dev[subject] = self._read_split(subject, "dev") if self.num_fewshot else []
        return docs

    def group_pool(self, doc: Doc, pool: list[Doc]) -> list[Doc]:
        return self._dev[doc.group]  # the subject's dev questions, in file order

    def describe(self, doc: Doc) -> str:
        return f"The following are multiple choice questions (with answers) about {doc.group.replace('_', ' ')}.\n\n"

    def text(self, doc: Doc) -> str:
        options = "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, doc.fields["options"]))
        return f"{doc.fields['question'].strip()}{options}\nAnswer:"

    def score(self, doc: Doc, logprobs, greedy) -> dict[str, float]:
        return {"acc": super().score(doc, logprobs, greedy)["acc"]}

    def aggregate(self, docs: list[Doc], records: list[dict[str, float]]) -> dict[str, Any]:
        by_subject: dict[str, list[float]] = {}
        for doc, record in zip(docs, records):
            by_subject.setdefault(doc.group, []).append(record["acc"])
        by_category: dict[str, list[float]] = {}
        for subject, values in by_subject.items():
            by_category.setdefault(CATEGORY[subject], []).extend(values)
        means = {s: sum(v) / len(v) for s, v in by_subject.items()}
        return {"acc_macro": sum(means.values()) / len(means),
                "categories": {c: {"acc": sum(v) / len(v), "n": len(v)} for c, v in sorted(by_category.items())},
                "subjects": {s: {"acc": means[s], "n": len(by_subject[s])} for s in sorted(means)}}
