"""Making a label project: read the prompts, get two or more responses per prompt (generated here by each model,
or read from a candidates file), store them with the annotators.

Input files (every mistake is a DataError naming the file and line):

- prompts: JSONL with ``{"prompt": "text"}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line, or
  a ``.txt`` file with one prompt per line;
- candidates: JSONL with ``{"prompt": "text" | [messages], "responses": [{"model": "name", "text": "..."}, ...]}``
  (or ``"messages"`` for the prompt), two or more responses from distinct models per line.

Generation uses forgeline's own generator. A chat prompt (messages) is rendered with the model's chat template; a
plain prompt is too when the tokenizer has one (the models being compared are assistants), else it is encoded as
text.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, ForgelineError
from .store import MAX_RESPONSES, NewItem

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class PromptRecord:
    prompt: Prompt
    line: int  # where it came from, for error messages


# ---------------------------------------------------------------------------------------------------------------
# reading inputs
# ---------------------------------------------------------------------------------------------------------------


def _text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of a UTF-8 file; a missing file or a bad byte is a DataError naming the place."""
    if not path.is_file():
        raise DataError("no such file" if not path.exists() else "not a file", path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})", path, line) from None
    return [(i, line) for i, line in enumerate(text.splitlines(), start=1)]


def _json_lines(path: Path) -> list[tuple[int, Any]]:
    records = []
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc.msg} (column {exc.colno})", path, lineno) from None
    return records


def _check_messages(messages: Any, path: Path, line: int) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...}", path, line)
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"message {i} must be an object with a 'role' string and a 'content' string", path,
                            line)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _prompt_of(record: Any, path: Path, line: int) -> Prompt:
    """The prompt of one JSONL record: a 'prompt' string (or messages list) or a 'messages' list."""
    if not isinstance(record, dict):
        raise DataError(f"each line must be a JSON object, got {type(record).__name__}", path, line)
    if "messages" in record:
        return _check_messages(record["messages"], path, line)
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        return _check_messages(prompt, path, line)
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError("each line needs a non-empty 'prompt' string or a 'messages' list", path, line)
    return prompt


def read_prompts(path: str | Path) -> list[PromptRecord]:
    path = Path(path)
    if path.suffix.lower() == ".txt":
        records = [PromptRecord(line, n) for n, line in _text_lines(path) if line.strip()]
    else:
        records = [PromptRecord(_prompt_of(r, path, n), n) for n, r in _json_lines(path)]
    if not records:
        raise DataError("no prompts in the file", path)
    return records


def read_candidates(path: str | Path) -> list[NewItem]:
    path = Path(path)
    items = []
    for line, record in _json_lines(path):
        prompt = _prompt_of(record, path, line)
        responses = record.get("responses")
        if not isinstance(responses, list):
            raise DataError("each line needs a 'responses' list of {\"model\": ..., \"text\": ...}", path, line)
        if not 2 <= len(responses) <= MAX_RESPONSES:
            raise DataError(f"{len(responses)} response{'' if len(responses) == 1 else 's'}; a comparison needs "
                            f"2 to {MAX_RESPONSES}", path, line)
        pairs = []
        for i, r in enumerate(responses):
            if not (isinstance(r, dict) and isinstance(r.get("model"), str) and r["model"].strip()
                    and isinstance(r.get("text"), str)):
                raise DataError(f"response {i} must be an object with a non-empty 'model' string and a 'text' "
                                "string", path, line)
            pairs.append((r["model"], r["text"]))
        models = [m for m, _ in pairs]
        if len(set(models)) != len(models):
            twice = sorted({m for m in models if models.count(m) > 1})
            raise DataError(f"model {twice[0]!r} appears twice; each response must come from a different model",
                            path, line)
        items.append(NewItem(prompt=prompt, responses=tuple(pairs)))
    if not items:
        raise DataError("no candidates in the file", path)
    return items


def parse_model_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """(name, path) for each --model: `PATH`, named by the path as given, or `NAME=PATH`."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():  # a path that itself contains '='
            name, path = spec.rstrip("/") or spec, spec
        if not name or not path:
            raise ConfigError(f"--model {spec!r}: give PATH or NAME=PATH")
        out.append((name, path))
    names = [n for n, _ in out]
    if len(out) < 2:
        raise ConfigError(f"a comparison needs two or more models; got {len(out)} (--model PATH, repeated)")
    if len(out) > MAX_RESPONSES:
        raise ConfigError(f"{len(out)} models; at most {MAX_RESPONSES} can be compared on one item")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"model {twice[0]!r} is given twice; name them apart with --model NAME=PATH")
    return out


# ---------------------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------------------


def _default_load(path: str, dtype: str):
    from ..model.formats import load_model

    return load_model(path, dtype=dtype)


def generate_items(prompts: Sequence[PromptRecord], models: Sequence[tuple[str, str]], *, settings,
                   prompts_path: str | Path, load: Callable[[str, str], Any] | None = None,
                   batch_size: int = 8, report: Callable[[str], None] | None = None) -> list[NewItem]:
    """One response per model per prompt. `settings` carries the generation flags `forgeline generate` takes
    (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, dtype); models are loaded one at a
    time, so only one is in memory."""
    from ..chat import generation_config, render_chat, stop_ids
    from ..model.inference.generate import encode_prompt, generate

    load = load or _default_load
    texts: list[list[tuple[str, str]]] = [[] for _ in prompts]
    for name, path in models:
        loaded = load(path, settings.dtype)
        tok = loaded.tokenizer
        if tok is None:
            raise ForgelineError(f"model {name} ({path}) has no tokenizer; generating from text needs one")
        cfg = generation_config(loaded, settings, default_max_new=256)
        chat = tok.chat_template is not None
        if chat:
            cfg.stop_token_ids = sorted(stop_ids(loaded, chat=True))
        ids = []
        for record in prompts:
            if isinstance(record.prompt, list):
                if not chat:
                    raise DataError(f"a chat prompt (messages), but model {name} ({path}) has no chat template",
                                    prompts_path, record.line)
                ids.append(render_chat(tok, record.prompt))
            elif chat:
                ids.append(render_chat(tok, [{"role": "user", "content": record.prompt}]))
            else:
                ids.append(encode_prompt(tok, record.prompt, loaded.add_bos))
            context = loaded.model.cfg.max_seq_len
            if len(ids[-1]) >= context:
                raise DataError(f"the prompt is {len(ids[-1])} tokens for model {name}, whose context is {context} "
                                "tokens (at least one new token must fit)", prompts_path, record.line)
        start = time.perf_counter()
        for first in range(0, len(ids), batch_size):
            for row, completion in enumerate(generate(loaded.model, ids[first:first + batch_size], cfg,
                                                      tokenizer=tok), start=first):
                texts[row].append((name, (completion.text or "").strip()))
        if report is not None:
            report(f"{name}: {len(ids)} responses in {time.perf_counter() - start:.1f} s")
        del loaded  # before the next one loads, or both would be in memory at once
    return [NewItem(prompt=record.prompt, responses=tuple(pairs)) for record, pairs in zip(prompts, texts)]


def print_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
