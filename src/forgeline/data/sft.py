"""SFT data: records from JSONL, JSON arrays and Parquet, turned into conversations and then into tokenized samples.

Record formats (``format=``; ``"auto"`` picks one per file from its first record):

* ``"instruction"`` (Alpaca): ``{"instruction", "input", "output"}``. ``input`` may be empty, null or absent. The
  instruction and input become the user turn, in the Alpaca prompt (``instruction_style="alpaca"``) or as plain
  text (``"plain"``: the instruction, a blank line, the input), and ``output`` the assistant turn.
* ``"messages"``: ``{"messages": [{"role", "content"}, ...]}``, any number of turns, an optional leading system turn.
* ``"sharegpt"``: ``{"conversations": [{"from", "value"}, ...]}`` with ``from`` human/user, gpt/assistant or system.

Every key is configurable (:class:`SFTFields`): GSM8K, for one, is ``format="instruction"`` with
``fields={"instruction": "question", "output": "answer"}``. A record's own system prompt (a leading system message, or
the ``system`` field) is kept; otherwise ``system_prompt`` is used when configured, and none is added when not.

Errors. A record that does not fit is one :class:`~forgeline.errors.DataError` naming the place (``file:line`` for
JSONL, ``file: item N`` for a JSON array, ``file: row N`` for Parquet; counting from 1 for lines, from 0 for items and
rows, as editors and dataframes do) and the field. With ``on_error="skip"`` such records are skipped instead and
counted in :class:`SFTStats` by reason. Invalid UTF-8 is always an error naming the file and line: a skipped record
would hide a file that is broken throughout. Samples longer than ``max_length`` are truncated (or, with
``overlong="drop"``, dropped) and counted, never silently.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields as dataclass_fields
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from forgeline.errors import ConfigError, DataError

from .chat_templates import LOSS_ON, ChatTemplate
from .packing import TokenizedSample
from .sources import Inputs, _format_of, iter_jsonl_lines, read_json_records, resolve_inputs

__all__ = [
    "FORMATS",
    "RecordError",
    "SFTExample",
    "SFTFields",
    "SFTStats",
    "detect_format",
    "iter_file_records",
    "iter_sft_examples",
    "load_sft_samples",
    "record_to_messages",
    "tokenize_examples",
]

logger = logging.getLogger(__name__)

FORMATS = ("auto", "instruction", "messages", "sharegpt")
ON_ERROR = ("raise", "skip")
OVERLONG = ("truncate", "drop")
INSTRUCTION_STYLES = ("alpaca", "plain")

# The prompts of Stanford Alpaca (tatsu-lab/stanford_alpaca, train.py), so a model tuned here is prompted the same way.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
_PARQUET_BATCH_ROWS = 1024
_SKIP_EXAMPLES = 5


@dataclass(frozen=True)
class SFTFields:
    """The keys records use; the defaults are the usual Alpaca, OpenAI-messages and ShareGPT names."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"
    messages: str = "messages"
    role: str = "role"
    content: str = "content"
    conversations: str = "conversations"
    sharegpt_role: str = "from"
    sharegpt_content: str = "value"

    @classmethod
    def from_config(cls, value: SFTFields | Mapping[str, str] | None) -> SFTFields:
        """From a mapping of overrides (a config section); unknown keys and non-string names are errors."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"fields must be a mapping of field names, got {type(value).__name__}")
        known = [f.name for f in dataclass_fields(cls)]
        for key, name in value.items():
            if key not in known:
                raise ConfigError(f"fields.{key} is not a known field; known: {', '.join(known)}")
            if not isinstance(name, str) or not name:
                raise ConfigError(f"fields.{key} must be a non-empty string, got {name!r}")
        return cls(**dict(value))


@dataclass
class SFTExample:
    """One conversation and where it came from: a JSONL ``line``, or a ``label`` ("item 3", "row 7")."""

    messages: list[dict[str, str]]
    path: Path
    line: int | None = None
    label: str | None = None

    @property
    def where(self) -> str:
        return _where(self.path, self.line, self.label)

    def error(self, message: str) -> DataError:
        return _error(self.path, self.line, self.label, message)


class _RecordCounts:
    """The counting that SFTStats and PreferenceStats share: records read, skipped records by reason with the first
    few as examples, and the warnings a recipe logs. Not a dataclass, so each stats class keeps its own fields in its
    own order (its constructor and ``to_dict`` stay as they are); the annotations say what those fields must include."""

    records: int
    skipped: int
    skip_reasons: Counter
    skip_examples: list[str]

    def skip(self, where: str, reason: str) -> None:
        self.skipped += 1
        self.skip_reasons[reason] += 1
        if len(self.skip_examples) < _SKIP_EXAMPLES:
            self.skip_examples.append(f"{where}: {reason}")

    def _skipped_summary(self) -> str:
        """The "N skipped (...)" part of ``summary()``: the three commonest reasons."""
        reasons = "; ".join(f"{n}x {r}" for r, n in self.skip_reasons.most_common(3))
        return f"{self.skipped} skipped ({reasons})"

    def _warn(self, log: logging.Logger, what: str) -> None:
        """Log the stats class's own ``summary()`` and the skipped examples, on the caller's module logger."""
        log.warning(f"{what}: %s", self.summary())
        for example in self.skip_examples:
            log.warning("skipped %s", example)


@dataclass
class SFTStats(_RecordCounts):
    """What loading did to the data; ``summary()`` is the line a recipe logs."""

    records: int = 0
    skipped: int = 0
    skip_reasons: Counter = field(default_factory=Counter)
    skip_examples: list[str] = field(default_factory=list)
    samples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_targets: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def summary(self) -> str:
        parts = [f"{self.records} records -> {self.samples} samples ({self.tokens} tokens, {self.target_tokens} "
                 "learned)"]
        if self.skipped:
            parts.append(self._skipped_summary())
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped as longer than max_length")
        if self.dropped_no_targets:
            parts.append(f"{self.dropped_no_targets} dropped with nothing left to learn")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records, "skipped": self.skipped, "skip_reasons": dict(self.skip_reasons),
            "samples": self.samples, "truncated": self.truncated, "dropped_too_long": self.dropped_too_long,
            "dropped_no_targets": self.dropped_no_targets, "tokens": self.tokens, "target_tokens": self.target_tokens,
        }


class RecordError(Exception):
    """A record that does not fit its format; the message names the field, the caller adds the place."""


# --------------------------------------------------------------------------------------------------- records


def _present(record: Mapping) -> str:
    """The first keys of a record, for an error that says a field is missing."""
    return ", ".join(repr(k) for k in list(record)[:10]) or "none"


def detect_format(record: Any, fields: SFTFields) -> str:
    if not isinstance(record, Mapping):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if fields.messages in record:
        return "messages"
    if fields.conversations in record:
        return "sharegpt"
    if fields.instruction in record and fields.output in record:
        return "instruction"
    raise RecordError(
        f"cannot tell the format: no {fields.messages!r} (messages), {fields.conversations!r} (sharegpt) or "
        f"{fields.instruction!r} + {fields.output!r} (instruction) field (fields present: {_present(record)}); "
        "set format and fields"
    )


def record_to_messages(
    record: Any,
    format: str,
    fields: SFTFields | None = None,
    *,
    system_prompt: str | None = None,
    instruction_style: str = "alpaca",
) -> list[dict[str, str]]:
    """One record as a list of ``{"role", "content"}`` messages (raises ``RecordError`` naming the field)."""
    fields = fields or SFTFields()
    if not isinstance(record, Mapping):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if format == "instruction":
        messages = _instruction_messages(record, fields, instruction_style)
    elif format == "messages":
        messages = _turns(record, fields.messages, fields.role, fields.content)
    elif format == "sharegpt":
        messages = _turns(record, fields.conversations, fields.sharegpt_role, fields.sharegpt_content)
    else:
        raise ConfigError(f"format must be one of {', '.join(FORMATS[1:])} here, got {format!r}")
    if messages[0]["role"] != "system":
        system = record.get(fields.system)
        if system is not None and not isinstance(system, str):
            raise RecordError(f"field {fields.system!r} must be a string, got {type(system).__name__}")
        system = system or system_prompt
        if system:
            messages.insert(0, {"role": "system", "content": system})
    return messages


def _instruction_messages(record: Mapping, fields: SFTFields, style: str) -> list[dict[str, str]]:
    instruction = _string(record, fields.instruction, required=True)
    output = _string(record, fields.output, required=True)
    extra = _string(record, fields.input, required=False)
    if not instruction.strip():
        raise RecordError(f"field {fields.instruction!r} is empty")
    if style == "alpaca":
        prompt = (ALPACA_PROMPT.format(instruction=instruction, input=extra) if extra.strip()
                  else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
    else:
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _string(record: Mapping, key: str, *, required: bool) -> str:
    if key not in record or record[key] is None:
        if required:
            raise RecordError(f"missing field {key!r} (fields present: {_present(record)})")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _turns(record: Mapping, key: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    turns = record.get(key)
    if key not in record:
        raise RecordError(f"missing field {key!r} (fields present: {_present(record)})")
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"field {key!r} must be a non-empty list of messages, got {_describe(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        here = f"{key}[{i}]"
        if not isinstance(turn, Mapping):
            raise RecordError(f"{here} must be an object with {role_key!r} and {content_key!r}, got {_describe(turn)}")
        if role_key not in turn:
            raise RecordError(f"{here} has no {role_key!r}")
        role = _ROLES.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise RecordError(f"{here}.{role_key} is {turn[role_key]!r}; expected one of {', '.join(_ROLES)}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            what = "missing" if content_key not in turn else f"a {type(content).__name__}"
            raise RecordError(f"{here}.{content_key} must be a string, is {what}")
        if role == "system" and i != 0:
            raise RecordError(f"{here} is a system message; only the first message may be one")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(f"field {key!r} has no assistant message, so there is nothing to learn")
    return messages


def _describe(value: Any) -> str:
    return "an empty list" if value == [] else type(value).__name__


# ----------------------------------------------------------------------------------------------- reading files


def _where(path: Path, line: int | None, label: str | None) -> str:
    return f"{path}:{line}" if line is not None else f"{path}: {label}"


def _error(path: Path, line: int | None, label: str | None, message: str) -> DataError:
    # DataError prints "path:line: " itself; JSON items and Parquet rows have no line, so their label leads.
    if line is not None:
        return DataError(message, path, line)
    return DataError(f"{label}: {message}", path)


class RecordPlace(NamedTuple):
    """Where a record is: its file and a JSONL ``line`` or a ``label`` ("item 3", "row 7")."""

    path: Path
    line: int | None
    label: str | None

    @property
    def where(self) -> str:
        return _where(self.path, self.line, self.label)

    def error(self, message: str) -> DataError:
        return _error(self.path, self.line, self.label, message)


def iter_file_records(path: Path) -> Iterator[tuple[int | None, str | None, Any]]:
    """``(line, label, record)`` for every record of one file: a JSONL line number, or a label ("item 3" in a JSON
    array, "row 7" in Parquet). A malformed JSONL line comes as a ``RecordError`` in place of the record, so the
    caller's error policy decides about it."""
    kind = _format_of(path)
    if kind == "jsonl":
        yield from _jsonl_records(path)
    elif kind == "json":
        yield from _json_records(path)
    elif kind == "parquet":
        yield from _parquet_records(path)
    else:
        raise DataError("SFT data must be JSONL (.jsonl), a JSON array (.json) or Parquet (.parquet)", path)


def _jsonl_records(path: Path) -> Iterator[tuple[int | None, str | None, Any]]:
    for lineno, line in iter_jsonl_lines(path):
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as e:
            record = RecordError(f"malformed JSON: {e.msg} (column {e.colno})")
        yield lineno, None, record


def _json_records(path: Path) -> Iterator[tuple[int | None, str | None, Any]]:
    for i, record in enumerate(read_json_records(path)):
        yield None, f"item {i}", record


def _parquet_records(path: Path) -> Iterator[tuple[int | None, str | None, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file: {e}", path) from None
    row = 0
    with parquet:
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                for record in batch.to_pylist():
                    yield None, f"row {row}", record
                    row += 1
        except UnicodeDecodeError:
            raise DataError(f"row {row}: invalid UTF-8; forgeline reads text as strict UTF-8", path) from None
        except pa.ArrowException as e:
            raise DataError(f"cannot read Parquet data near row {row}: {e}", path) from None


# ------------------------------------------------------------------------------------------------ pipeline


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


T = TypeVar("T")
FileRecords = Callable[[Path], Iterable[tuple[int | None, str | None, Any]]]


def iter_converted_records(
    inputs: Inputs,
    convert: Callable[[Any, str, RecordPlace], T],
    *,
    detect: Callable[[Any], str],
    format: str = "auto",
    read: FileRecords = iter_file_records,
    on_error: str = "raise",
    stats: _RecordCounts,
) -> Iterator[T]:
    """``convert(record, format, place)`` for every record of every input (files, directories, globs), in input
    order: the file loop SFT and preference data share, so both read, detect and fail alike.

    ``format="auto"`` takes each file's format from ``detect(first record)``; ``read`` gives a file's
    ``(line, label, record)``, a record being a ``RecordError`` where it could not be parsed. A ``RecordError`` from
    the record, ``detect`` or ``convert`` is a ``DataError`` naming the place, or with ``on_error="skip"`` a skip
    counted in ``stats``. An empty file, or one that holds no records, is always an error: it is a wrong path or a
    broken export far more often than intended."""
    for path in resolve_inputs(inputs):
        if path.stat().st_size == 0:
            raise DataError("file is empty", path)
        # One format per file, not per record: a record that does not fit it is an error, not another format.
        file_format = None if format == "auto" else format
        seen = 0
        for line, label, record in read(path):
            seen += 1
            stats.records += 1
            place = RecordPlace(path, line, label)
            try:
                if isinstance(record, RecordError):
                    raise record
                if file_format is None:
                    file_format = detect(record)
                converted = convert(record, file_format, place)
            except RecordError as e:
                if on_error == "raise":
                    raise place.error(str(e)) from None
                stats.skip(place.where, str(e))
                continue
            yield converted
        if seen == 0:
            raise DataError("file holds no records", path)


def iter_sft_examples(
    inputs: Inputs,
    *,
    format: str = "auto",
    fields: SFTFields | Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    instruction_style: str = "alpaca",
    on_error: str = "raise",
    stats: SFTStats | None = None,
) -> Iterator[SFTExample]:
    """Every record of every input (files, directories, globs) as a conversation, in input order."""
    _check_choice("format", format, FORMATS)
    _check_choice("on_error", on_error, ON_ERROR)
    _check_choice("instruction_style", instruction_style, INSTRUCTION_STYLES)
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ConfigError(f"system_prompt must be a string, got {type(system_prompt).__name__}")
    fields = SFTFields.from_config(fields)
    stats = stats if stats is not None else SFTStats()

    def to_example(record: Any, file_format: str, place: RecordPlace) -> SFTExample:
        messages = record_to_messages(record, file_format, fields, system_prompt=system_prompt,
                                      instruction_style=instruction_style)
        return SFTExample(messages, place.path, place.line, place.label)

    # A generator itself (yield from, not return), so the checks above still run at the first next(), as before.
    yield from iter_converted_records(inputs, to_example, detect=lambda record: detect_format(record, fields),
                                      format=format, on_error=on_error, stats=stats)


def tokenize_examples(
    examples: Iterable[SFTExample],
    template: ChatTemplate,
    *,
    max_length: int,
    loss_on: str = "assistant",
    overlong: str = "truncate",
    on_error: str = "raise",
    stats: SFTStats | None = None,
) -> list[TokenizedSample]:
    """Render and encode every example; cut or drop the ones longer than ``max_length`` (counted in ``stats``)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")
    _check_choice("loss_on", loss_on, LOSS_ON)
    _check_choice("overlong", overlong, OVERLONG)
    _check_choice("on_error", on_error, ON_ERROR)
    stats = stats if stats is not None else SFTStats()
    samples = []
    for example in examples:
        try:
            sample = template.encode(example.messages, loss_on=loss_on)
        except DataError as e:
            if on_error == "raise":
                raise example.error(str(e)) from None
            stats.skip(example.where, str(e))
            continue
        if len(sample) > max_length:
            if overlong == "drop":
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
            sample = sample.truncated(max_length)
        if sample.n_targets == 0:
            stats.dropped_no_targets += 1
            continue
        samples.append(sample)
        stats.samples += 1
        stats.tokens += len(sample)
        stats.target_tokens += sample.n_targets
    return samples


def load_sft_samples(
    inputs: Inputs,
    template: ChatTemplate,
    *,
    max_length: int,
    format: str = "auto",
    fields: SFTFields | Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    instruction_style: str = "alpaca",
    loss_on: str = "assistant",
    overlong: str = "truncate",
    on_error: str = "raise",
) -> tuple[list[TokenizedSample], SFTStats]:
    """Files to training samples in one call: what the ``sft`` recipe uses. Logs a warning for anything cut,
    dropped or skipped, and fails when nothing is left to train on."""
    stats = SFTStats()
    examples = iter_sft_examples(inputs, format=format, fields=fields, system_prompt=system_prompt,
                                 instruction_style=instruction_style, on_error=on_error, stats=stats)
    samples = tokenize_examples(examples, template, max_length=max_length, loss_on=loss_on, overlong=overlong,
                                on_error=on_error, stats=stats)
    if stats.skipped or stats.truncated or stats.dropped_too_long or stats.dropped_no_targets:
        stats._warn(logger, "SFT data")
    if not samples:
        raise DataError(f"no usable SFT samples: {stats.summary()}")
    return samples, stats
