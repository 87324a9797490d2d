"""Prompt data for online RL: records whose prompt the policy completes, with whatever else the reward needs (a
reference answer, unit tests) kept as they are.

Each record (JSONL, JSON array or Parquet) becomes the text `prompt_format.format(**record)` (default "{prompt}";
GSM8K's files: "Question: {question}\\nAnswer:"). A record whose `prompt` is a list of chat messages, or any prompt
when a chat template is given, is rendered through the template with the assistant's header after it. Prompts
longer than `max_prompt_length` tokens keep their last tokens (the question is at the end).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from .sft import RecordError, iter_file_records
from .sources import resolve_inputs


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # what the policy sees (after the chat template, when there is one)
    record: dict  # the record as read: the reward's reference answers


def load_prompts(inputs: Sequence[str | Path], tokenizer, *, prompt_format: str = "{prompt}", template=None,
                 max_prompt_length: int | None = None, add_bos: bool = False) -> list[Prompt]:
    prompts = []
    for path in resolve_inputs(list(inputs)):
        for line, label, record in iter_file_records(path):
            where = f"{path}:{line}" if line is not None else f"{path} ({label})"
            if isinstance(record, RecordError):
                raise DataError(f"{where}: {record}")
            if not isinstance(record, dict):
                raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
            text = _prompt_text(record, prompt_format, template, where)
            ids = tokenizer.encode(text, add_bos=add_bos and tokenizer.bos_id is not None)
            if not ids:
                raise DataError(f"{where}: the prompt is empty")
            if max_prompt_length is not None and len(ids) > max_prompt_length:
                ids = ids[-max_prompt_length:]
            prompts.append(Prompt(ids=ids, text=text, record=record))
    if not prompts:
        raise DataError(f"no prompts in {', '.join(str(p) for p in inputs)}")
    return prompts


def _prompt_text(record: dict[str, Any], prompt_format: str, template, where: str) -> str:
    messages = record.get("prompt") if isinstance(record.get("prompt"), list) else None
    if messages is not None and prompt_format == "{prompt}":
        if template is None:
            raise DataError(f"{where}: the prompt is a list of chat messages; give a chat template "
                            "(data.template) to render it")
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DataError(f"{where}: prompt messages must be objects with 'role' and 'content'")
        return template.render(messages, add_generation_prompt=True)
    try:
        text = prompt_format.format(**record)
    except KeyError as e:
        raise DataError(f"{where}: data.prompt_format names the field {e.args[0]!r}, which this record does not "
                        f"have (it has {', '.join(sorted(record)) or 'no fields'})") from None
    except (IndexError, ValueError) as e:
        raise DataError(f"{where}: data.prompt_format {prompt_format!r} cannot be filled: {e}") from None
    if template is not None:
        return template.render([{"role": "user", "content": text}], add_generation_prompt=True)
    return text
