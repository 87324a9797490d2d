"""Preference data for reward models, DPO, ORPO and KTO: records to prompt/response messages, then token pairs.

Record formats (``format=``; ``"auto"`` picks one per file from its first record, as SFT data does):

* ``"pairs"``: ``{"prompt", "chosen", "rejected"}``. ``prompt`` is a string (one user message) or a list of chat
  messages ``[{"role", "content"}]`` (system, user and assistant turns). ``chosen`` and ``rejected`` are a string (one
  assistant message) or a list of messages starting with an assistant turn (TRL's conversational form). Without a
  ``prompt`` field, ``chosen`` and ``rejected`` are whole conversations (TRL's implicit prompt): the prompt is their
  common leading messages and each response the rest, whose first message must be an assistant turn.
* ``"hh"`` (Anthropic HH-RLHF): ``{"chosen", "rejected"}``, each a whole transcript
  ``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."``. The two share everything up to the
  final Assistant turn: they are split at the last ``"\\n\\nAssistant:"`` they share (for a well-formed record, each
  one's last), the transcript before it becomes the prompt (Human -> user, Assistant -> assistant, each text stripped
  of surrounding whitespace) and the rest, stripped, one assistant message. A few HH replies run on into invented
  ``"Human: ..."`` or ``"\\n\\nAssistant: ..."`` text of their own; that stays part of the reply, since it is what
  the model wrote. Transcripts that part inside a Human turn are an error ("chosen and rejected differ before the
  last Assistant turn"), as is a transcript without ``"\\n\\nAssistant:"``.
* ``"ranked"``: ``{"prompt", "responses": [r0, r1, ...], "ranking": [...]}``, each response a string or messages.
  ``ranking`` lists response indices from best to worst: a permutation of ``0 .. n-1`` (``[2, 0, 1]``: response 2 is
  best, 1 worst). Instead of ``ranking``, ``"scores": [float, ...]`` (one per response, higher is better) may be
  given. A record gives every ordered pair, better response as chosen: ``n(n-1)/2`` pairs from a ranking; from scores,
  one per two responses with different scores (equal scores give no pair), with the score difference as margin.
* ``"unpaired"`` (KTO): ``{"prompt", "completion", "label"}``, ``completion`` a string or messages, ``label`` true
  (desirable) or false.

Pairs records may carry a ``margin`` (a number), or ``score_chosen`` and ``score_rejected`` (margin = their
difference; ``margin`` wins when both are given). An optional ``system`` string adds a system turn when the prompt
has none, and so does a configured ``system_prompt``. Keys not named here (ids, model names) are ignored. Every key is
configurable (:class:`PreferenceFields`).

Errors follow :mod:`forgeline.data.sft`: a record that does not fit is one :class:`~forgeline.errors.DataError`
naming the place (``file:line`` for JSONL, ``file: item N`` for a JSON array, ``file: row N`` for Parquet) and the
field; with ``on_error="skip"`` it is skipped and counted by reason. Invalid UTF-8 is always an error. A pair whose
chosen and rejected responses are identical teaches nothing (its DPO gradient is zero, a reward model sees a tie):
it is counted in :class:`PreferenceStats` and dropped, never silently.

Tokenization renders prompt + response with the chat template and learns (``loss_mask``) every assistant turn of the
response, never a prompt token. Chosen and rejected carry the same prompt tokens. Too long: the prompt is cut from
the left to ``max_prompt_length`` (when set); if prompt plus the longer response still exceed ``max_length``, the
prompt is cut from the left further so that the longer response fits whole (keeping at least one prompt token). When
even that cannot fit it, the prompt keeps at most ``max_prompt_length`` tokens (half of ``max_length`` when unset) and
the responses are cut from the right. A prompt that starts with the tokenizer's BOS keeps it in front when cut (to
two tokens or more). Each case is counted; a pair with a response left without learned tokens is dropped and counted.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

from forgeline.errors import ConfigError, DataError

from .chat_templates import ChatTemplate
from .packing import TokenizedSample
from .sft import (
    _ROLES,
    ON_ERROR,
    RecordError,
    RecordPlace,
    SFTFields,
    _check_choice,
    _describe,
    _present,
    _RecordCounts,
    iter_converted_records,
    iter_file_records,
)
from .sources import Inputs, _format_of

__all__ = [
    "FORMATS",
    "PreferenceFields",
    "PreferencePair",
    "PreferenceStats",
    "TokenizedCompletion",
    "TokenizedPair",
    "UnpairedExample",
    "detect_format",
    "iter_preference_examples",
    "load_preference_data",
    "record_to_examples",
    "tokenize_pairs",
    "tokenize_unpaired",
]

logger = logging.getLogger(__name__)

FORMATS = ("auto", "pairs", "hh", "ranked", "unpaired")
KINDS = ("pairs", "unpaired")

_HH_ASSISTANT = "\n\nAssistant:"
_HH_HUMAN = "\n\nHuman:"
# A turn marker: "\n\nHuman:" / "\n\nAssistant:", or the same at the very start (exports that strip the leading
# blank line).
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class PreferenceFields:
    """The keys records use; the defaults are TRL's names (and Anthropic HH's ``chosen`` / ``rejected``)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    responses: str = "responses"
    ranking: str = "ranking"
    scores: str = "scores"
    completion: str = "completion"
    label: str = "label"
    margin: str = "margin"
    score_chosen: str = "score_chosen"
    score_rejected: str = "score_rejected"
    system: str = "system"
    role: str = "role"
    content: str = "content"

    # The same checks as SFTFields (unknown keys and non-string names are errors); it builds whatever class it is on.
    from_config = classmethod(SFTFields.from_config.__func__)  # type: ignore[attr-defined]


Message = dict[str, str]


@dataclass(frozen=True)
class PreferencePair:
    """A prompt and two responses to it, ``chosen`` preferred; ``where`` names the record ("path:line",
    "path: item N", "path: row N")."""

    prompt: list[Message]  # messages before the responses (usually ending with a user turn)
    chosen: list[Message]  # the preferred response: messages, the first an assistant turn
    rejected: list[Message]
    margin: float | None
    where: str


@dataclass(frozen=True)
class UnpairedExample:
    """A prompt and one completion labelled desirable (``True``) or not (KTO)."""

    prompt: list[Message]
    completion: list[Message]
    label: bool
    where: str


Example = Union[PreferencePair, UnpairedExample]


@dataclass(frozen=True, eq=False)
class TokenizedPair:
    """Chosen and rejected, each prompt + response tokens with ``loss_mask`` on the response's assistant tokens only.
    Both start with the same ``prompt_length`` prompt tokens."""

    chosen: TokenizedSample
    rejected: TokenizedSample
    margin: float | None
    prompt_length: int = 0


@dataclass(frozen=True, eq=False)
class TokenizedCompletion:
    """Prompt + completion tokens (``loss_mask`` on the completion); the first ``prompt_length`` ids are the prompt."""

    sample: TokenizedSample
    prompt_length: int
    label: bool


@dataclass
class PreferenceStats(_RecordCounts):
    """What reading and tokenizing did to the data; ``summary()`` is the line a recipe logs.

    ``pairs`` / ``unpaired``: examples the records gave (a ranked record gives several pairs); ``identical``: pairs
    dropped because chosen and rejected are the same (as text, or as tokens within ``max_length``); ``kept``:
    tokenized pairs or completions returned, of ``tokens`` tokens in all (chosen and rejected both counted).
    """

    records: int = 0
    pairs: int = 0
    unpaired: int = 0
    identical: int = 0
    skipped: int = 0
    skip_reasons: Counter = field(default_factory=Counter)
    skip_examples: list[str] = field(default_factory=list)
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped_too_long: int = 0
    kept: int = 0
    tokens: int = 0

    def summary(self) -> str:
        made = [f"{self.pairs} pairs"] if self.pairs or not self.unpaired else []
        if self.unpaired:
            made.append(f"{self.unpaired} unpaired examples")
        parts = [f"{self.records} records -> {' + '.join(made)}"]
        if self.identical:
            parts.append(f"{self.identical} identical pairs dropped (chosen == rejected)")
        if self.skipped:
            parts.append(self._skipped_summary())
        if self.prompt_truncated:
            parts.append(f"{self.prompt_truncated} with the prompt cut from the left")
        if self.response_truncated:
            parts.append(f"{self.response_truncated} with responses cut to max_length")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped with no response token within max_length")
        if self.kept or self.tokens or self.dropped_too_long or self.prompt_truncated or self.response_truncated:
            parts.append(f"{self.kept} kept ({self.tokens} tokens)")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records, "pairs": self.pairs, "unpaired": self.unpaired, "identical": self.identical,
            "skipped": self.skipped, "skip_reasons": dict(self.skip_reasons),
            "prompt_truncated": self.prompt_truncated, "response_truncated": self.response_truncated,
            "dropped_too_long": self.dropped_too_long, "kept": self.kept, "tokens": self.tokens,
        }


# --------------------------------------------------------------------------------------------------- records


def detect_format(record: Any, fields: PreferenceFields) -> str:
    if not isinstance(record, Mapping):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if fields.responses in record:
        return "ranked"
    if fields.completion in record and fields.label in record:
        return "unpaired"
    if fields.chosen in record and fields.rejected in record:
        # Whole transcripts as strings without a prompt can only be HH's; TRL's implicit prompt uses message lists.
        if record.get(fields.prompt) is None and isinstance(record[fields.chosen], str):
            return "hh"
        return "pairs"
    raise RecordError(
        f"cannot tell the format: no {fields.chosen!r} + {fields.rejected!r} (pairs, hh), {fields.responses!r} "
        f"(ranked) or {fields.completion!r} + {fields.label!r} (unpaired) field (fields present: {_present(record)}); "
        "set format and fields"
    )


def record_to_examples(
    record: Any,
    format: str,
    fields: PreferenceFields | None = None,
    *,
    system_prompt: str | None = None,
    where: str = "",
) -> list[Example]:
    """One record as its pairs (one, or several for a ranked record) or its unpaired example; raises ``RecordError``
    naming the field. Identical pairs are returned too: :func:`iter_preference_examples` counts and drops them."""
    fields = fields or PreferenceFields()
    if not isinstance(record, Mapping):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if format == "pairs":
        if record.get(fields.prompt) is None:
            prompt, chosen, rejected = _implicit_prompt(record, fields)
        else:
            prompt = _prompt(record, fields)
            chosen = _response(_required(record, fields.chosen), fields.chosen, fields)
            rejected = _response(_required(record, fields.rejected), fields.rejected, fields)
        prompt = _with_system(prompt, record, fields, system_prompt)
        return [PreferencePair(prompt, chosen, rejected, _margin(record, fields), where)]
    if format == "hh":
        prompt, chosen, rejected = _hh(record, fields)
        prompt = _with_system(prompt, record, fields, system_prompt)
        return [PreferencePair(prompt, chosen, rejected, _margin(record, fields), where)]
    if format == "ranked":
        prompt = _with_system(_prompt(record, fields), record, fields, system_prompt)
        return [PreferencePair(prompt, better, worse, margin, where)
                for better, worse, margin in _ranked(record, fields)]
    if format == "unpaired":
        prompt = _with_system(_prompt(record, fields), record, fields, system_prompt)
        completion = _response(_required(record, fields.completion), fields.completion, fields)
        label = _required(record, fields.label)
        if not isinstance(label, bool):
            raise RecordError(f"field {fields.label!r} must be true or false, got {_show(label)}")
        return [UnpairedExample(prompt, completion, label, where)]
    raise ConfigError(f"format must be one of {', '.join(FORMATS[1:])} here, got {format!r}")


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _required(record: Mapping, key: str) -> Any:
    if record.get(key) is None:
        raise RecordError(f"missing field {key!r} (fields present: {_present(record)})")
    return record[key]


def _messages(value: Any, name: str, fields: PreferenceFields, *, response: bool) -> list[Message]:
    """A string (one user turn in a prompt, one assistant turn in a response) or a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant" if response else "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise RecordError(f"{_name(name)} must be a string or a non-empty list of messages, got {_describe(value)}")
    messages = []
    for i, turn in enumerate(value):
        here = f"{name}[{i}]"
        if not isinstance(turn, Mapping):
            raise RecordError(
                f"{here} must be an object with {fields.role!r} and {fields.content!r}, got {_describe(turn)}")
        if turn.get(fields.role) is None:
            raise RecordError(f"{here} has no {fields.role!r}")
        role = _ROLES.get(turn[fields.role]) if isinstance(turn[fields.role], str) else None
        if role is None:
            raise RecordError(f"{here}.{fields.role} is {turn[fields.role]!r}; expected one of {', '.join(_ROLES)}")
        content = turn.get(fields.content)
        if not isinstance(content, str):
            what = "missing" if content is None else f"a {type(content).__name__}"
            raise RecordError(f"{here}.{fields.content} must be a string, is {what}")
        if role == "system" and (response or i != 0):
            raise RecordError(f"{here} is a system message; only the first message of a prompt may be one")
        messages.append({"role": role, "content": content})
    if response and messages[0]["role"] != "assistant":
        raise RecordError(f"{name}[0] is a {messages[0]['role']} message; a response starts with an assistant turn")
    return messages


def _name(name: str) -> str:
    # "field 'chosen'" for a record's field, plain "responses[1]" for an element of one
    return name if "[" in name else f"field {name!r}"


def _prompt(record: Mapping, fields: PreferenceFields) -> list[Message]:
    value = _required(record, fields.prompt)
    if isinstance(value, str) and not value.strip():
        raise RecordError(f"field {fields.prompt!r} is empty")
    return _messages(value, fields.prompt, fields, response=False)


def _response(value: Any, name: str, fields: PreferenceFields) -> list[Message]:
    return _messages(value, name, fields, response=True)


def _implicit_prompt(record: Mapping, fields: PreferenceFields) -> tuple[list[Message], ...]:
    """TRL's implicit prompt: ``chosen`` and ``rejected`` are whole conversations; their shared start is the prompt."""
    chosen, rejected = _required(record, fields.chosen), _required(record, fields.rejected)
    for name, value in ((fields.chosen, chosen), (fields.rejected, rejected)):
        if not isinstance(value, list):
            raise RecordError(
                f"no {fields.prompt!r} field, so {name!r} must be a whole conversation (a list of messages) sharing "
                f"its prompt with the other response, got {_describe(value)}; Anthropic HH transcripts are format=hh")
    chosen = _messages(chosen, fields.chosen, fields, response=False)
    rejected = _messages(rejected, fields.rejected, fields, response=False)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) == len(rejected):
        return chosen[:-1], chosen[-1:], rejected[-1:]  # identical: counted and dropped by the caller
    if n == 0:
        raise RecordError(f"no {fields.prompt!r} field, and {fields.chosen!r} and {fields.rejected!r} share no "
                          "leading messages to be the prompt")
    for name, messages in ((fields.chosen, chosen), (fields.rejected, rejected)):
        if n == len(messages):
            raise RecordError(f"{name!r} has no messages after the prompt it shares with the other response")
        if messages[n]["role"] != "assistant":
            raise RecordError(f"{name}[{n}], the first message after the shared prompt, is a {messages[n]['role']} "
                              "message; a response starts with an assistant turn")
    return chosen[:n], chosen[n:], rejected[n:]


def _with_system(prompt: list[Message], record: Mapping, fields: PreferenceFields,
                 system_prompt: str | None) -> list[Message]:
    if prompt and prompt[0]["role"] == "system":
        return prompt
    system = record.get(fields.system)
    if system is not None and not isinstance(system, str):
        raise RecordError(f"field {fields.system!r} must be a string, got {type(system).__name__}")
    system = system or system_prompt
    return [{"role": "system", "content": system}, *prompt] if system else prompt


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"{_name(name)} must be a finite number, got {_show(value)}")
    return float(value)


def _margin(record: Mapping, fields: PreferenceFields) -> float | None:
    if record.get(fields.margin) is not None:
        return _number(record[fields.margin], fields.margin)
    chosen, rejected = record.get(fields.score_chosen), record.get(fields.score_rejected)
    if chosen is None and rejected is None:
        return None
    if chosen is None or rejected is None:
        given, missing = ((fields.score_chosen, fields.score_rejected) if rejected is None
                          else (fields.score_rejected, fields.score_chosen))
        raise RecordError(f"field {given!r} is given without {missing!r}; the margin needs both")
    return _number(chosen, fields.score_chosen) - _number(rejected, fields.score_rejected)


def _hh(record: Mapping, fields: PreferenceFields) -> tuple[list[Message], list[Message], list[Message]]:
    chosen, rejected = _required(record, fields.chosen), _required(record, fields.rejected)
    for name, value in ((fields.chosen, chosen), (fields.rejected, rejected)):
        if not isinstance(value, str):
            raise RecordError(f"field {name!r} must be a transcript string (format=hh), got {_describe(value)}")
        if _HH_ASSISTANT not in value:
            raise RecordError(f"field {name!r} has no {_HH_ASSISTANT!r} turn")
    # The last Assistant marker both transcripts share. For a well-formed record it is each one's last; splitting each
    # at its own last would tear a reply that runs on into "\n\nAssistant:" text (HH has a few) away from its pair.
    shared = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(_HH_ASSISTANT, 0, shared)
    start = cut + len(_HH_ASSISTANT)
    if cut < 0 or _HH_HUMAN in chosen[start:] or _HH_HUMAN in rejected[start:]:
        raise RecordError(f"{fields.chosen!r} and {fields.rejected!r} differ before the last Assistant turn "
                          f"(they part at character {shared})")
    parts = _HH_TURN.split(chosen[:cut])
    if parts[0].strip():
        raise RecordError(f"field {fields.chosen!r} has text before its first 'Human:' turn: {parts[0][:40]!r}")
    prompt = [{"role": _HH_ROLES[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]
    if not prompt:
        raise RecordError(f"field {fields.chosen!r} has no turn before its last Assistant turn, so no prompt")
    return (prompt, [{"role": "assistant", "content": chosen[start:].strip()}],
            [{"role": "assistant", "content": rejected[start:].strip()}])


def _ranked(record: Mapping, fields: PreferenceFields) -> list[tuple[list[Message], list[Message], float | None]]:
    responses = _required(record, fields.responses)
    if not isinstance(responses, list) or len(responses) < 2:
        got = f"a list of {len(responses)}" if isinstance(responses, list) else _describe(responses)
        raise RecordError(f"field {fields.responses!r} must be a list of at least 2 responses, got {got}")
    messages = [_response(r, f"{fields.responses}[{i}]", fields) for i, r in enumerate(responses)]
    n = len(messages)
    ranking, scores = record.get(fields.ranking), record.get(fields.scores)
    if ranking is None and scores is None:
        raise RecordError(f"missing field {fields.ranking!r} (response indices, best first) or {fields.scores!r} (one "
                          f"per response, higher is better) (fields present: {_present(record)})")
    if ranking is not None and scores is not None:
        raise RecordError(f"give {fields.ranking!r} or {fields.scores!r}, not both")
    if ranking is not None:
        if (not isinstance(ranking, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ranking)
                or sorted(ranking) != list(range(n))):
            raise RecordError(f"field {fields.ranking!r} must list every response index 0..{n - 1} once, best first; "
                              f"got {ranking!r}")
        return [(messages[ranking[a]], messages[ranking[b]], None) for a in range(n) for b in range(a + 1, n)]
    if not isinstance(scores, list) or len(scores) != n:
        got = f"a list of {len(scores)}" if isinstance(scores, list) else _describe(scores)
        raise RecordError(f"field {fields.scores!r} must be a list of {n} numbers (one per response), got {got}")
    values = [_number(s, f"{fields.scores}[{i}]") for i, s in enumerate(scores)]
    order = sorted(range(n), key=lambda i: -values[i])  # stable: ties keep the record's order
    return [(messages[i], messages[j], values[i] - values[j])
            for a, i in enumerate(order) for j in order[a + 1:] if values[i] > values[j]]


# ----------------------------------------------------------------------------------------------- reading files


def _file_records(path: Path) -> Iterator[tuple[int | None, str | None, Any]]:
    if _format_of(path) not in ("jsonl", "json", "parquet"):
        raise DataError("preference data must be JSONL (.jsonl, .jsonl.gz), a JSON array (.json) or Parquet "
                        "(.parquet)", path)
    try:
        yield from iter_file_records(path)
    except (OSError, EOFError) as e:  # unreadable file, corrupt or truncated gzip stream
        raise DataError(f"cannot read: {getattr(e, 'strerror', None) or e}", path) from None


def iter_preference_examples(
    inputs: Inputs,
    *,
    format: str = "auto",
    fields: PreferenceFields | Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    on_error: str = "raise",
    stats: PreferenceStats | None = None,
) -> Iterator[Example]:
    """Every record of every input (files, directories, globs) as its preference pairs or unpaired example, in input
    order. Pairs whose chosen and rejected are identical are counted in ``stats.identical`` and not yielded."""
    _check_choice("format", format, FORMATS)
    _check_choice("on_error", on_error, ON_ERROR)
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ConfigError(f"system_prompt must be a string, got {type(system_prompt).__name__}")
    fields = PreferenceFields.from_config(fields)
    stats = stats if stats is not None else PreferenceStats()

    def to_examples(record: Any, file_format: str, place: RecordPlace) -> list[Example]:
        return record_to_examples(record, file_format, fields, system_prompt=system_prompt, where=place.where)

    # The file loop is SFT's (empty files, format detection, on_error); what is preference's own is that one record
    # may give several examples, and the counting of identical pairs.
    for examples in iter_converted_records(inputs, to_examples, detect=lambda record: detect_format(record, fields),
                                           format=format, read=_file_records, on_error=on_error, stats=stats):
        for example in examples:
            if isinstance(example, UnpairedExample):
                stats.unpaired += 1
            elif example.chosen == example.rejected:
                stats.identical += 1
                continue
            else:
                stats.pairs += 1
            yield example


# ------------------------------------------------------------------------------------------------ tokenizing


def _check_lengths(max_length: Any, max_prompt_length: Any) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")
    if max_prompt_length is not None and (isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int)
                                          or not 1 <= max_prompt_length < max_length):
        raise ConfigError(f"max_prompt_length must be an integer in [1, max_length) = [1, {max_length}), got "
                          f"{max_prompt_length!r}")


def _encode_prompt(template: ChatTemplate, prompt: list[Message]) -> tuple[str, np.ndarray]:
    text = template.render(prompt, add_generation_prompt=True)
    ids = np.asarray(template.tokenizer.backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    return text, ids


def _encode_response(template: ChatTemplate, prompt: list[Message], prompt_text: str, prompt_ids: np.ndarray,
                     response: list[Message]) -> tuple[np.ndarray, np.ndarray, int]:
    """Ids of prompt + response, the mask on the response's assistant turns only, and how many leading ids are the
    prompt's (the prompt rendered alone, with the generation prompt, as the model is given it at inference)."""
    messages = prompt + response
    if not template.render(messages).startswith(prompt_text):
        raise DataError(f"template {template.name!r} renders the prompt differently when a response follows it, so "
                        "the response's tokens cannot be told apart; use template=chatml or llama3")
    # The whole conversation is encoded once, as SFT does; loss_on="assistant" marks every assistant turn, and the
    # prompt's own assistant turns are cleared below.
    sample = template.encode(messages, loss_on="assistant")
    ids, mask = sample.input_ids.astype(np.int64), sample.loss_mask.copy()
    n = min(len(ids), len(prompt_ids))
    differ = np.flatnonzero(ids[:n] != prompt_ids[:n])
    # Usually every prompt token; one fewer where the tokenizer merges the prompt's last characters with the
    # response's first (that token then belongs to the response, as the template's mask already says).
    k = int(differ[0]) if differ.size else n
    if k == 0:
        raise DataError("the prompt renders to no tokens of its own")
    mask[:k] = False
    return ids, mask, k


def _cut_prompt(prompt: np.ndarray, keep: int, bos_id: int | None) -> np.ndarray:
    """The last ``keep`` tokens; a leading BOS stays in front (models are never trained or run without it)."""
    if keep >= len(prompt):
        return prompt
    if bos_id is not None and keep >= 2 and prompt[0] == bos_id:
        return np.concatenate([prompt[:1], prompt[len(prompt) - keep + 1:]])
    return prompt[len(prompt) - keep:]


def _fit(prompt: np.ndarray, responses: list[tuple[np.ndarray, np.ndarray]], max_length: int,
         max_prompt_length: int | None, bos_id: int | None, stats: PreferenceStats
         ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Cut the prompt from the left and, when the longer response cannot fit beside one prompt token, the responses
    from the right (see the module doc); count what was cut."""
    longest = max(len(ids) for ids, _ in responses)
    keep = len(prompt) if max_prompt_length is None else min(len(prompt), max_prompt_length)
    if keep + longest > max_length:
        if longest < max_length:
            keep = max_length - longest
        elif max_prompt_length is None:
            keep = min(keep, max_length // 2)  # else keep <= max_prompt_length < max_length already
    if keep < len(prompt):
        stats.prompt_truncated += 1
        prompt = _cut_prompt(prompt, keep, bos_id)
    room = max_length - len(prompt)
    if longest > room:
        stats.response_truncated += 1
        responses = [(ids[:room], mask[:room]) for ids, mask in responses]
    return prompt, responses


def _sample(prompt: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> TokenizedSample:
    return TokenizedSample(np.concatenate([prompt, ids]), np.concatenate([np.zeros(len(prompt), dtype=bool), mask]))


def _place(example: Any) -> str:
    return getattr(example, "where", "") or "<example>"


def tokenize_pairs(
    pairs: Iterable[PreferencePair],
    template: ChatTemplate,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    stats: PreferenceStats | None = None,
    on_error: str = "raise",
) -> list[TokenizedPair]:
    """Render and encode every pair, chosen and rejected over the same prompt tokens; cut what is too long and drop
    pairs left identical or without a learned response token (all counted in ``stats``)."""
    _check_lengths(max_length, max_prompt_length)
    _check_choice("on_error", on_error, ON_ERROR)
    stats = stats if stats is not None else PreferenceStats()
    bos_id = template.tokenizer.bos_id
    out = []
    for pair in pairs:
        if not isinstance(pair, PreferencePair):
            what = "an unpaired (KTO) example" if isinstance(pair, UnpairedExample) else f"a {type(pair).__name__}"
            raise DataError(f"{_place(pair)}: {what}, not a preference pair; prompt/completion/label data is for KTO "
                            "(kind=unpaired)")
        try:
            prompt_text, prompt_ids = _encode_prompt(template, pair.prompt)
            chosen, chosen_mask, k_chosen = _encode_response(template, pair.prompt, prompt_text, prompt_ids,
                                                             pair.chosen)
            rejected, rejected_mask, k_rejected = _encode_response(template, pair.prompt, prompt_text, prompt_ids,
                                                                   pair.rejected)
        except DataError as e:
            if on_error == "raise":
                raise DataError(f"{pair.where}: {e}") from None
            stats.skip(pair.where, str(e))
            continue
        # Both lead with prompt_ids[:k]; the shorter k keeps the shared prefix exact when one response's first
        # characters merged with the prompt's last token and the other's did not.
        k = min(k_chosen, k_rejected)
        prompt = chosen[:k]
        if not np.array_equal(rejected[:k], prompt):  # cannot happen: both are prefixes of prompt_ids
            raise AssertionError(f"{pair.where}: chosen and rejected prompt tokens differ")
        prompt, (c, r) = _fit(prompt, [(chosen[k:], chosen_mask[k:]), (rejected[k:], rejected_mask[k:])],
                              max_length, max_prompt_length, bos_id, stats)
        if len(c[0]) == len(r[0]) and np.array_equal(c[0], r[0]):
            stats.identical += 1  # the same tokens (the responses differ only beyond max_length)
            continue
        if not (c[1].any() and r[1].any()):
            stats.dropped_too_long += 1
            continue
        tokenized = TokenizedPair(_sample(prompt, *c), _sample(prompt, *r), pair.margin, len(prompt))
        out.append(tokenized)
        stats.kept += 1
        stats.tokens += len(tokenized.chosen) + len(tokenized.rejected)
    return out


def tokenize_unpaired(
    examples: Iterable[UnpairedExample | PreferencePair],
    template: ChatTemplate,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    stats: PreferenceStats | None = None,
    on_error: str = "raise",
) -> list[TokenizedCompletion]:
    """Render and encode every KTO example (prompt + completion, the mask on the completion). A preference pair
    gives two: its chosen response labelled desirable and its rejected one undesirable, as TRL's KTO does."""
    _check_lengths(max_length, max_prompt_length)
    _check_choice("on_error", on_error, ON_ERROR)
    stats = stats if stats is not None else PreferenceStats()
    bos_id = template.tokenizer.bos_id
    out = []
    for example in _unpaired(examples):
        try:
            prompt_text, prompt_ids = _encode_prompt(template, example.prompt)
            ids, mask, k = _encode_response(template, example.prompt, prompt_text, prompt_ids, example.completion)
        except DataError as e:
            if on_error == "raise":
                raise DataError(f"{example.where}: {e}") from None
            stats.skip(example.where, str(e))
            continue
        prompt, [(ids, mask)] = _fit(ids[:k], [(ids[k:], mask[k:])], max_length, max_prompt_length, bos_id, stats)
        if not mask.any():
            stats.dropped_too_long += 1
            continue
        sample = _sample(prompt, ids, mask)
        out.append(TokenizedCompletion(sample, len(prompt), example.label))
        stats.kept += 1
        stats.tokens += len(sample)
    return out


def _unpaired(examples: Iterable[UnpairedExample | PreferencePair]) -> Iterator[UnpairedExample]:
    for example in examples:
        if isinstance(example, UnpairedExample):
            yield example
        elif isinstance(example, PreferencePair):
            yield UnpairedExample(example.prompt, example.chosen, True, example.where)
            yield UnpairedExample(example.prompt, example.rejected, False, example.where)
        else:
            raise DataError(f"{_place(example)}: expected an UnpairedExample or a PreferencePair, got "
                            f"{type(example).__name__}")


def load_preference_data(
    inputs: Inputs,
    template: ChatTemplate,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    format: str = "auto",
    fields: PreferenceFields | Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    on_error: str = "raise",
    kind: Literal["pairs", "unpaired"] = "pairs",
) -> tuple[list[TokenizedPair] | list[TokenizedCompletion], PreferenceStats]:
    """Files to tokenized pairs (reward model, DPO, ORPO: ``kind="pairs"``) or completions (KTO:
    ``kind="unpaired"``, which also takes pair data, split in two) in one call. Logs a warning for anything cut,
    dropped or skipped, and fails when nothing is left to train on."""
    _check_choice("kind", kind, KINDS)
    _check_lengths(max_length, max_prompt_length)
    stats = PreferenceStats()
    examples = iter_preference_examples(inputs, format=format, fields=fields, system_prompt=system_prompt,
                                        on_error=on_error, stats=stats)
    if kind == "pairs":
        out: list = tokenize_pairs(examples, template, max_length=max_length, max_prompt_length=max_prompt_length,
                                   stats=stats, on_error=on_error)
    else:
        out = tokenize_unpaired(examples, template, max_length=max_length, max_prompt_length=max_prompt_length,
                                stats=stats, on_error=on_error)
    if (stats.skipped or stats.identical or stats.prompt_truncated or stats.response_truncated
            or stats.dropped_too_long):
        stats._warn(logger, "preference data")
    if not out:
        raise DataError(f"no usable preference {'pairs' if kind == 'pairs' else 'examples'}: {stats.summary()}")
    return out, stats
