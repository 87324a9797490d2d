"""Benchmark tasks: each is data (a reader of the benchmark's canonical files) plus a small scorer, in one file.

A multiple-choice task gives, per document, a prompt (`text`), the answer texts (`choices`, each scored as
" " + choice after the prompt, the harness's target delimiter) and the gold index; the engine's log-likelihoods
decide `acc` (the highest log-likelihood) and `acc_norm` (the highest log-likelihood per character of the answer).
A generation task gives a prompt, stop strings and a `score(doc, text)`.

Adding a task: write `eval/tasks/mytask.py` with a subclass of `MultipleChoiceTask` or `GenerationTask` that
implements `read(path)` (documents from the files) and `text(doc)` (and for generation `score`), set `name`,
`version` (bump it whenever the prompt changes: reports carry it) and `default_path`, then add it to `TASKS` below.
docs/eval.md walks through one.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ...errors import ConfigError

__all__ = ["Doc", "GenerationTask", "MultipleChoiceTask", "TASKS", "Task", "get_task", "shared_data",
           "task_classes"]


def shared_data() -> Path:
    """The project's real data folder (../shared/data beside the checkout, or $FORGELINE_SHARED_DATA)."""
    import os

    env = os.environ.get("FORGELINE_SHARED_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


@dataclass
class Doc:
    id: str
    fields: dict[str, Any]
    choices: list[str] = field(default_factory=list)
    gold: int | list[int] = 0
    group: str = ""  # MMLU's subject, for per-group scores


class Task(ABC):
    name: ClassVar[str]
    version: ClassVar[int]
    kind: ClassVar[str]  # "multiple_choice" or "generate_until"
    default_path: ClassVar[str]  # relative to the shared data folder
    num_fewshot: ClassVar[int] = 0
    fewshot_sampler: ClassVar[str] = "random"  # "random" (seeded) or "first_n"
    description: ClassVar[str] = ""  # before the few-shot examples
    fewshot_delimiter: ClassVar[str] = "\n\n"
    target_delimiter: ClassVar[str] = " "

    def __init__(self, path: str | Path | None = None, *, num_fewshot: int | None = None, seed: int = 1234):
        self.path = Path(path) if path is not None else shared_data() / self.default_path
        if not self.path.exists():
            raise ConfigError(f"{self.name}: {self.path} does not exist (pass the benchmark's files with --data)")
        self.num_fewshot = self.num_fewshot if num_fewshot is None else num_fewshot
        self.seed = seed
        self.start_fewshot_draw()

    # -- to implement ----------------------------------------------------------------------------------------------

    @abstractmethod
    def read(self, path: Path) -> list[Doc]:
        """The evaluation documents of the benchmark's files."""

    @abstractmethod
    def text(self, doc: Doc) -> str:
        """One document's prompt, without few-shot examples."""

    def target(self, doc: Doc) -> str:  # a few-shot example's answer
        gold = doc.gold if isinstance(doc.gold, int) else doc.gold[0]
        return doc.choices[gold]

    def fewshot_pool(self, docs: list[Doc]) -> list[Doc]:  # where examples come from (default: the same docs)
        return docs

    def describe(self, doc: Doc) -> str:
        return self.description

    def contamination_text(self, doc: Doc) -> str:
        """What a model trained on this document would have seen: its prompt and every answer (multiple choice) or
        its reference answer (generation); the contamination check looks for it in training data."""
        if self.kind == "multiple_choice":
            return self.text(doc) + "\n" + "\n".join(doc.choices)
        return self.text(doc) + " " + self.target(doc)

    # -- shared ----------------------------------------------------------------------------------------------------

    def docs(self) -> list[Doc]:
        return self.read(self.path)

    def prompt(self, doc: Doc, pool: list[Doc]) -> str:
        """description + few-shot examples + this document's text, as the harness assembles them."""
        shots = self.fewshot(doc, pool)
        examples = "".join(self.text(d) + self.target_delimiter + self.target(d) + self.fewshot_delimiter
                           for d in shots)
        return self.describe(doc) + examples + self.text(doc)

    def start_fewshot_draw(self) -> None:
        """Restart the seeded draw of few-shot examples (evaluate() does, before a task's first prompt)."""
        self._draw = random.Random(self.seed)

    def chat_prompt(self, doc: Doc, pool: list[Doc], tokenizer) -> str:
        """The prompt through the model's chat template, as the harness builds it with --apply_chat_template (and
        its default --fewshot_as_multiturn): the description as the system message, each few-shot example a user
        turn and an assistant turn, the document a last user turn, then the assistant's header. A template that
        refuses a system message gets none (the harness's fallback)."""
        from ...errors import ForgelineError

        messages = [{"role": "system", "content": self.describe(doc)}] if self.describe(doc) else []
        for shot in self.fewshot(doc, pool):
            messages += [{"role": "user", "content": self.text(shot)},
                         {"role": "assistant", "content": self.target(shot)}]
        messages.append({"role": "user", "content": self.text(doc)})
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ForgelineError:
            if messages[0]["role"] != "system":
                raise
            return tokenizer.apply_chat_template(messages[1:], add_generation_prompt=True)

    def fewshot(self, doc: Doc, pool: list[Doc]) -> list[Doc]:
        """The examples for `doc`, drawn as lm-evaluation-harness draws them, so that the same seed gives the same
        prompts: one generator per task, seeded once and drawn from in the order the documents are evaluated; from
        the evaluated documents themselves it draws one more than needed and drops `doc` (never its own example)."""
        n = self.num_fewshot
        if n == 0:
            return []
        candidates = self.group_pool(doc, pool)
        own_split = any(d is doc for d in candidates)
        if self.fewshot_sampler == "first_n":
            return [d for d in candidates if d is not doc][:n]
        if len(candidates) - own_split < n:
            raise ConfigError(f"{self.name}: {n} few-shot examples asked for, {len(candidates) - own_split} "
                              "available")
        if not own_split:
            return self._draw.sample(candidates, n)
        shots = [d for d in self._draw.sample(candidates, n + 1) if d is not doc and d != doc][:n]
        if len(shots) < n:  # copies of `doc` in the pool were drawn too: draw again without any of them
            shots = self._draw.sample([d for d in candidates if d is not doc and d != doc], n)
        return shots

    def group_pool(self, doc: Doc, pool: list[Doc]) -> list[Doc]:
        return pool

    @property
    def label(self) -> str:
        return f"{self.name}" + (f" ({self.num_fewshot}-shot)" if self.num_fewshot else "")


class MultipleChoiceTask(Task):
    kind = "multiple_choice"
    metrics: ClassVar[tuple[str, ...]] = ("acc", "acc_norm")

    def aggregate(self, docs: list[Doc], records: list[dict[str, float]]) -> dict[str, Any]:
        """Task-specific summaries beyond each metric's mean (MMLU's subjects and categories)."""
        return {}

    def score(self, doc: Doc, logprobs: Sequence[float], greedy: Sequence[bool]) -> dict[str, float]:
        gold = doc.gold
        acc = float(_argmax(logprobs) == gold)
        norm = [lp / max(len(c), 1) for lp, c in zip(logprobs, doc.choices)]
        return {"acc": acc, "acc_norm": float(_argmax(norm) == gold)}


class GenerationTask(Task):
    kind = "generate_until"
    until: ClassVar[tuple[str, ...]] = ()
    max_new_tokens: ClassVar[int] = 256
    metrics: ClassVar[tuple[str, ...]] = ()
    samples: int = 1  # generations per document (sampled when > 1)
    temperature: float = 0.0
    top_p: float | None = None

    def score_samples(self, doc: Doc, texts: list[str]) -> dict[str, float]:
        """Metrics of several generations of one document (default: the first one's)."""
        return self.score(doc, texts[0])

    @abstractmethod
    def score(self, doc: Doc, text: str) -> dict[str, float]:
        """Per-document metrics of one generated text."""

    def extract(self, text: str) -> dict[str, str | None]:
        """The answers read from a generated text (for the per-sample log)."""
        return {}

    def aggregate(self, docs: list[Doc], records: list[dict[str, float]]) -> dict[str, Any]:
        return {}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def _registry() -> dict[str, type[Task]]:
    from .arc import ArcChallenge, ArcEasy
    from .arithmetic import Arithmetic
    from .gsm8k import GSM8K, GSM8KChainOfThought
    from .hellaswag import HellaSwag
    from .humaneval import HumanEval
    from .mmlu import MMLU
    from .truthfulqa import TruthfulQAMC1, TruthfulQAMC2

    return {t.name: t for t in (Arithmetic, ArcEasy, ArcChallenge, HellaSwag, MMLU, GSM8K, GSM8KChainOfThought, HumanEval,
                                TruthfulQAMC1, TruthfulQAMC2)}


TASKS: dict[str, type[Task]] = {}


def task_classes() -> dict[str, type[Task]]:
    """Every registered task by name (the registry filled on first use)."""
    if not TASKS:
        TASKS.update(_registry())
    return TASKS


def get_task(name: str, **kwargs: Any) -> Task:
    task_classes()
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; the tasks are: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)
