"""An AI judge for RLAIF: which of two responses to a conversation is better, under a rubric, read from the judge
model's log-probabilities of answering "1" or "2" (so there is no free text to misparse).

Position bias is the known weakness of LLM judges (they prefer the first, or the second, response whatever it says).
Every pair is judged in both orders: P(A better) from "A shown first" and from "A shown second". The verdict is A
(or B) when both orders agree, and a tie when they do not (`inconsistent`); the confidence is the mean of the two
probabilities. A judge that always picks the same position gives only ties, which is the honest outcome.

    judge = AIJudge(RequestEngine(model, tokenizer), rubric=DEFAULT_RUBRIC, chat=True)
    verdicts = judge.compare([(conversation_text, response_a, response_b), ...])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError

DEFAULT_RUBRIC = ("A better response answers what was asked, is correct, is clear, and refuses only what would cause "
                  "harm. Length alone is no merit.")

PROMPT = """You compare two responses of an AI assistant to the same conversation. {rubric}

Conversation:
{conversation}

Response 1:
{first}

Response 2:
{second}

Which response is better, 1 or 2?"""


@dataclass(frozen=True)
class Verdict:
    winner: str  # "a", "b" or "tie" (the two orders disagree)
    p_a_first: float  # P(A better) with A shown as response 1
    p_a_second: float  # ... with A shown as response 2

    @property
    def confidence(self) -> float:
        """P(A better), averaged over the two orders."""
        return (self.p_a_first + self.p_a_second) / 2

    @property
    def consistent(self) -> bool:
        return self.winner != "tie"


class AIJudge:
    """`engine`: a forgeline.eval RequestEngine on the judge model. chat: render the question as a user turn of the
    judge's chat template, the answer right after the assistant's header (an instruction-tuned judge); otherwise
    the plain prompt followed by "\\nAnswer:" and the answer after a space."""

    def __init__(self, engine, *, rubric: str = DEFAULT_RUBRIC, chat: bool = False):
        if not rubric.strip():
            raise ConfigError("the judge's rubric is empty")
        if chat and getattr(engine.tokenizer, "chat_template", None) is None:
            raise ConfigError("--chat-template: the judge model's tokenizer has no chat template")
        self.engine, self.rubric, self.chat = engine, rubric.strip(), chat

    def question(self, conversation: str, first: str, second: str) -> str:
        return judge_question(self.engine, PROMPT.format(rubric=self.rubric, conversation=conversation.strip(),
                                                         first=first.strip(), second=second.strip()), self.chat)

    def p_first_better(self, questions: Sequence[str]) -> list[float]:
        """P("1") / (P("1") + P("2")) for each question."""
        return first_answer_probability(self.engine, questions, ("1", "2"), chat=self.chat)

    def compare(self, items: Sequence[tuple[str, str, str]]) -> list[Verdict]:
        """(conversation, response A, response B) -> a Verdict each, from both orders."""
        questions = []
        for conversation, a, b in items:
            questions += [self.question(conversation, a, b), self.question(conversation, b, a)]
        p = self.p_first_better(questions)
        verdicts = []
        for i in range(len(items)):
            a_first, a_second = p[2 * i], 1.0 - p[2 * i + 1]
            if a_first > 0.5 and a_second > 0.5:
                winner = "a"
            elif a_first < 0.5 and a_second < 0.5:
                winner = "b"
            else:
                winner = "tie"
            verdicts.append(Verdict(winner=winner, p_a_first=a_first, p_a_second=a_second))
        return verdicts


def judge_question(engine, text: str, chat: bool) -> str:
    """A judge's question: a user turn of its chat template (the answer right after the assistant's header), or
    the plain text followed by "\nAnswer:"."""
    if chat:
        return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return text + "\nAnswer:"


def first_answer_probability(engine, questions: Sequence[str], answers: tuple[str, str], *, chat: bool
                             ) -> list[float]:
    """P(answers[0]) / (P(answers[0]) + P(answers[1])) for each question, from the engine's log-likelihoods (after
    a space, unless the question ends with a chat template's assistant header)."""
    if not chat:
        answers = (" " + answers[0], " " + answers[1])
    results = engine.loglikelihood([(q, a) for q in questions for a in answers])
    out = []
    for i in range(len(questions)):
        first, second = results[2 * i].logprob, results[2 * i + 1].logprob
        top = max(first, second)
        out.append(math.exp(first - top) / (math.exp(first - top) + math.exp(second - top)))
    return out


def conversation_text(messages: Sequence[dict]) -> str:
    """A prompt's messages as the plain transcript the judge reads."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n".join(f"{names.get(m['role'], m['role'].title())}: {m['content'].strip()}" for m in messages)
