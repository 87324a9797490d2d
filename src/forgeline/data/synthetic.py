"""Seeded synthetic arithmetic: questions with verifiable integer answers, for RL prompts, SFT, preference pairs and
pre-training text (``forgeline data synthetic``).

A problem is ``"What is 37 + 48?"`` with the answer ``85``; operations ``+``, ``-`` and ``x``, operands of ``digits``
digits, and ``steps`` operations applied left to right with the earlier ones in parentheses (``"(12 + 7) x 3"``).
Subtraction never goes below zero (the operands trade places when it would), so every answer is a plain digit
string. Everything is fixed by the seed and the difficulty: the same call gives the same records, and a larger ``n``
gives the smaller one's records first.

Splits. Each distinct question belongs to ``train`` or ``test`` by a stable hash of its text (``TEST_SHARE`` of all
questions are test), never by the seed or the position in a file, so a held-out set generated with any seed and size
shares no question with any training set, pre-training text included.

Record formats (each readable by forgeline's own readers):

* ``rl``: ``{"prompt": "What is 37 + 48?", "answer": "85"}``, the prompt records of an RL run, ``answer`` read by
  the ``arithmetic`` reward (:mod:`forgeline.rl.rewards`).
* ``sft``: ``{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "85"}]}``, the
  messages format of :mod:`forgeline.data.sft` (it has no prompt/completion format; messages need no field mapping
  and no Alpaca preamble).
* ``preference``: ``{"prompt": question, "chosen": "85", "rejected": "86"}``, the pairs format of
  :mod:`forgeline.data.preference`; the rejected answer is a near miss (off by 1, 2 or 10).
* ``text``: documents of arithmetic facts (``"12 + 7 = 19."``, ``"What is 12 + 7? 19."``) mixed with simple sentences
  (``"The cat sat on the mat."``), one fact or sentence a line, documents separated by a blank line: the plain-text
  form ``forgeline data prepare`` splits on its default ``text_separator="\\n\\n"``.

:func:`answer_of` reads the answer a completion gives; the reward and the evaluation both use it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgeline.errors import ConfigError
from forgeline.files import atomic_write_text

__all__ = [
    "KINDS",
    "OPERATIONS",
    "SPLITS",
    "TEST_SHARE",
    "Difficulty",
    "Problem",
    "answer_of",
    "iter_problems",
    "make_problems",
    "preference_records",
    "rl_records",
    "sft_records",
    "split_of",
    "synthetic_records",
    "text_documents",
    "write_synthetic",
]

OPERATIONS = ("+", "-", "x")
SPLITS = ("train", "test")
KINDS = ("rl", "sft", "preference", "text")
TEST_SHARE = 0.1
# Draws in a row that give no new question of the split before the space counts as exhausted; each draw takes
# microseconds, and a question still missing after this many has a chance well under 1e-9 per draw.
_MISSES_BEFORE_EXHAUSTED = 100_000
_NEAR_MISSES = (-10, -2, -1, 1, 2, 10)

_SUBJECTS = ("The cat", "The dog", "A bird", "The girl", "The boy", "My friend", "The old man", "A small fox")
_VERBS = ("sat on", "looked at", "ran to", "jumped over", "found", "liked", "walked past", "slept near")
_OBJECTS = ("the mat", "the tree", "a red ball", "the old house", "the river", "a big box", "the garden", "the door")

# An integer at the very start, not the head of a decimal ("85.5") or of a digit group ("85,000").
_LEADING_INTEGER = re.compile(r"\s*(-?\d+)(?![.,]?\d)")


@dataclass(frozen=True)
class Difficulty:
    """Operands of ``digits`` digits (0-9 for one digit), ``steps`` operations each drawn from ``ops``."""

    digits: int = 2
    steps: int = 1
    ops: tuple[str, ...] = OPERATIONS

    def __post_init__(self):
        _check_count("digits", self.digits)
        _check_count("steps", self.steps)
        if isinstance(self.ops, str) or not isinstance(self.ops, Sequence) or not self.ops:
            raise ConfigError(f"ops must be a non-empty list of operations from {', '.join(OPERATIONS)}, "
                              f"got {self.ops!r}")
        unknown = [op for op in self.ops if op not in OPERATIONS]
        if unknown:
            raise ConfigError(f"ops: unknown operation {unknown[0]!r}; choose from {', '.join(OPERATIONS)}")
        object.__setattr__(self, "ops", tuple(dict.fromkeys(self.ops)))


@dataclass(frozen=True)
class Problem:
    expression: str  # "(12 + 7) x 3"
    answer: int

    @property
    def question(self) -> str:
        return f"What is {self.expression}?"


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _check_split(split: Any) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def split_of(question: str) -> str:
    """The split a question belongs to, by a hash that is the same in every process and Python version."""
    digest = hashlib.blake2b(question.encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") < TEST_SHARE * 2**64 else "train"


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _draw(rng: random.Random, difficulty: Difficulty) -> Problem:
    value = _operand(rng, difficulty.digits)
    text = str(value)
    for step in range(difficulty.steps):
        op = rng.choice(difficulty.ops)
        operand = _operand(rng, difficulty.digits)
        left = text if step == 0 else f"({text})"
        if op == "-" and value < operand:
            text, value = f"{operand} - {left}", operand - value
        else:
            text = f"{left} {op} {operand}"
            value = value + operand if op == "+" else value - operand if op == "-" else value * operand
    return Problem(text, value)


def iter_problems(*, split: str = "train", seed: int = 0, difficulty: Difficulty = Difficulty()
                  ) -> Iterator[Problem]:
    """An endless stream of the split's problems, repeats included (pre-training text wants the frequencies)."""
    _check_split(split)
    rng = random.Random(seed)
    misses = 0
    while True:
        problem = _draw(rng, difficulty)
        if split_of(problem.question) == split:
            misses = 0
            yield problem
            continue
        misses += 1
        if misses >= _MISSES_BEFORE_EXHAUSTED:
            raise ConfigError(f"the {split} split holds no question at digits={difficulty.digits}, "
                              f"steps={difficulty.steps}, ops={' '.join(difficulty.ops)}; raise digits or steps")


def make_problems(n: int, *, split: str = "train", seed: int = 0, difficulty: Difficulty = Difficulty()
                  ) -> list[Problem]:
    """``n`` distinct problems of the split, in draw order."""
    _check_count("n", n)
    _check_split(split)
    rng = random.Random(seed)
    seen: set[str] = set()
    found: list[Problem] = []
    misses = 0
    while len(found) < n:
        problem = _draw(rng, difficulty)
        question = problem.question
        if question in seen or split_of(question) != split:
            misses += 1
            if misses >= _MISSES_BEFORE_EXHAUSTED:
                raise ConfigError(
                    f"n={n} is more than the {split} split holds: only {len(found)} distinct questions found at "
                    f"digits={difficulty.digits}, steps={difficulty.steps}, ops={' '.join(difficulty.ops)}; "
                    "lower n or raise digits or steps")
            continue
        misses = 0
        seen.add(question)
        found.append(problem)
    return found


def rl_records(n: int, *, split: str = "train", seed: int = 0, difficulty: Difficulty = Difficulty()
               ) -> list[dict[str, str]]:
    return [{"prompt": p.question, "answer": str(p.answer)}
            for p in make_problems(n, split=split, seed=seed, difficulty=difficulty)]


def sft_records(n: int, *, split: str = "train", seed: int = 0, difficulty: Difficulty = Difficulty()
                ) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": p.question}, {"role": "assistant", "content": str(p.answer)}]}
            for p in make_problems(n, split=split, seed=seed, difficulty=difficulty)]


def preference_records(n: int, *, split: str = "train", seed: int = 0, difficulty: Difficulty = Difficulty()
                       ) -> list[dict[str, str]]:
    # Its own stream, so the questions are exactly those of rl_records / sft_records with the same seed.
    rng = random.Random(f"rejected:{seed}")
    records = []
    for p in make_problems(n, split=split, seed=seed, difficulty=difficulty):
        wrong = rng.choice([p.answer + d for d in _NEAR_MISSES if p.answer + d >= 0])
        records.append({"prompt": p.question, "chosen": str(p.answer), "rejected": str(wrong)})
    return records


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."


def text_documents(n: int, *, split: str = "train", seed: int = 0, difficulty: Difficulty = Difficulty()
                   ) -> list[str]:
    """``n`` documents of two to five lines, each line a fact of the split (in one of two phrasings) or a sentence."""
    _check_count("n", n)
    _check_split(split)
    rng = random.Random(f"text:{seed}")
    problems = iter_problems(split=split, seed=seed, difficulty=difficulty)
    documents = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(2, 5)):
            if rng.random() < 0.5:
                lines.append(_sentence(rng))
                continue
            p = next(problems)
            lines.append(f"{p.expression} = {p.answer}." if rng.random() < 0.5 else f"{p.question} {p.answer}.")
        documents.append("\n".join(lines))
    return documents


def synthetic_records(kind: str, n: int, *, split: str = "train", seed: int = 0,
                      difficulty: Difficulty = Difficulty()) -> list[dict[str, Any]] | list[str]:
    """The records of one kind (``text``: documents)."""
    makers = {"rl": rl_records, "sft": sft_records, "preference": preference_records, "text": text_documents}
    if kind not in makers:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return makers[kind](n, split=split, seed=seed, difficulty=difficulty)


def write_synthetic(path: str | Path, kind: str, n: int, *, split: str = "train", seed: int = 0,
                    difficulty: Difficulty = Difficulty()) -> Path:
    """Write ``n`` records of ``kind`` atomically: JSONL (``.jsonl``) for records, plain text for ``text``."""
    path = Path(path)
    name = path.name.lower()
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    # The readers choose the format by extension: records anywhere else, or text in a .jsonl, would not load.
    if kind == "text" and name.endswith((".jsonl", ".ndjson", ".json", ".parquet", ".gz")):
        raise ConfigError(f"out: text is written as plain text, and data prepare would read {path.name} as another "
                          "format; use a .txt file")
    if kind != "text" and not name.endswith(".jsonl"):
        raise ConfigError(f"out: {kind} records are JSONL; give a .jsonl file, got {path.name}")
    records = synthetic_records(kind, n, split=split, seed=seed, difficulty=difficulty)
    if kind == "text":
        atomic_write_text(path, "\n\n".join(records) + "\n")
    else:
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def answer_of(text: str) -> str | None:
    """The integer a completion answers with: the one it starts with (after optional whitespace), as a canonical
    decimal string (``" 085."`` -> ``"85"``); None when it starts with anything else, or with a decimal.

    The first integer rather than the last number: a model early in training runs on past its answer into more
    questions and numbers, and what it committed to is its first word; and a reward read from the last number
    could be collected by listing several."""
    match = _LEADING_INTEGER.match(text)
    return str(int(match.group(1))) if match else None
