"""`forgeline generate` and `forgeline chat`: completions from the command line and an interactive terminal chat.

MODEL is anything :func:`forgeline.model.load_model` reads: a forgeline model dir, a Hugging Face dir, a .gguf
file, a training checkpoint or a run dir; through the command line (which passes forgeline.recipes.adapted's loader
as `load`) also an adapter directory or a run / checkpoint trained with `peft:`, on its base (`--base`).

The chat renders the whole conversation with the model's chat template each turn, streams the reply as it is
generated, and keeps the conversation until ``/reset``; ``/exit`` (or Ctrl-D) quits. When the conversation outgrows
the model's context, the oldest turns are dropped (the system message is kept).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from .errors import ConfigError, DataError, ForgelineError
from .model.inference.generate import Completion, GenerationConfig, default_stop_ids, encode_prompt, generate

# End-of-turn markers of common chat templates; a chat stops on them even when the tokenizer's EOS is another token
# (e.g. a forgeline-trained tokenizer whose EOS is <|endoftext|> with the ChatML template).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")

HELP = "/reset clears the conversation, /history shows it, /exit quits"


def add_generation_args(p) -> None:
    p.add_argument("model", metavar="MODEL", help="forgeline model dir, Hugging Face dir, .gguf file, checkpoint, "
                                                  "run dir or adapter dir")
    p.add_argument("--base", default=None, metavar="BASE",
                   help="the base model of an adapter dir or of a run trained with peft: (default: the one it records)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="at most this many new tokens per reply, >= 1 "
                                                                   "(default: 256 for generate, 512 for chat)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature, >= 0; 0 = greedy "
                                                                   "(default: the model's generation config, else "
                                                                   "greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens; 0 = no limit "
                                                           "(default: the model's generation config)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of tokens whose "
                                                             "probabilities reach p, 0 < p <= 1; 1 = off")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="penalise tokens already in the text (positive scores divided by it, negative ones "
                        "multiplied), > 0; 1 = off")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--system", default=None, help="system message (chat template prompts only)")
    p.add_argument("--quiet", action="store_true", help="do not print the new tokens and tokens/s on stderr")


# flag, attribute, test, what a valid value is: every flag is checked alike, before the model is loaded
_FLAG_RULES: tuple[tuple[str, str, Callable[[Any], bool], str], ...] = (
    ("--max-new-tokens", "max_new_tokens", lambda v: v >= 1, "an integer >= 1"),
    ("--temperature", "temperature", lambda v: math.isfinite(v) and v >= 0, "a number >= 0 (0 = greedy)"),
    ("--top-k", "top_k", lambda v: v >= 0, "an integer >= 0 (0 = no limit)"),
    ("--top-p", "top_p", lambda v: 0 < v <= 1, "a number with 0 < p <= 1"),
    ("--repetition-penalty", "repetition_penalty", lambda v: math.isfinite(v) and v > 0,
     "a number > 0 (1 = no penalty)"),
    ("--batch-size", "batch_size", lambda v: v >= 1, "an integer >= 1"),
)


def check_generation_args(args) -> None:
    for flag, name, ok, what in _FLAG_RULES:
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            raise ConfigError(f"{flag} must be {what}, got {value}")
    for text in args.stop or ():
        if not text:
            raise ConfigError("--stop must be a non-empty string")


def generation_config(loaded, args, *, default_max_new: int) -> GenerationConfig:
    check_generation_args(args)
    overrides: dict[str, Any] = {
        "top_k": args.top_k or None, "top_p": args.top_p, "repetition_penalty": args.repetition_penalty,
        "seed": args.seed, "stop_strings": tuple(args.stop) if args.stop else None,
    }
    if args.temperature is not None:
        overrides["do_sample"] = args.temperature > 0
        if args.temperature > 0:
            overrides["temperature"] = args.temperature
    elif args.top_k or args.top_p is not None:
        overrides["do_sample"] = True
    cfg = GenerationConfig.from_hf(loaded.generation_config, **overrides)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else default_max_new
    # --top-k 0 turns off a top_k from the model's generation config (None would mean "not given")
    top_k = None if args.top_k == 0 else cfg.top_k
    return replace(cfg, max_new_tokens=max_new, top_k=top_k, stop_token_ids=sorted(stop_ids(loaded, chat=False)))


def speed_line(completions: list[Completion], seconds: float) -> str:
    """New tokens and tokens/s of one generate call over its whole batch (prefill included)."""
    tokens = sum(len(c.tokens) for c in completions)
    rows = f"{len(completions)} prompts: " if len(completions) > 1 else ""
    return (f"[{rows}{tokens} new token{'' if tokens == 1 else 's'} in {seconds:.2f} s, "
            f"{tokens / max(seconds, 1e-9):.1f} tokens/s]")


CHAT_HINT = ("forgeline: note: the model answered with nothing (an immediate end token); it has a chat template, "
             "so it may expect chat messages: try --chat")


def stop_ids(loaded, *, chat: bool) -> set[int]:
    ids = default_stop_ids(loaded.tokenizer, loaded.generation_config)
    if chat and loaded.tokenizer is not None:
        for name in END_OF_TURN_TOKENS:
            i = loaded.tokenizer.token_to_id(name)
            if i is not None and i < loaded.model.cfg.vocab_size:
                ids.add(i)
    return ids


def _load(args, load: Callable[[Any], Any] | None = None):
    """The model to generate with: `load(args)` when the caller gives a loader (the command line's reads adapters
    too), else load_model."""
    from .model.formats import load_model

    loaded = load(args) if load is not None else load_model(args.model, dtype=args.dtype)
    if loaded.tokenizer is None:
        raise ForgelineError(f"{args.model} has no tokenizer; generation from text needs one")
    return loaded


def render_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


# ---------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DataError("no such file", path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"not valid JSON: {exc.msg}", path, lineno) from None
            if not isinstance(record, dict) or not (isinstance(record.get("prompt"), str)
                                                    or isinstance(record.get("messages"), list)):
                raise DataError("each line needs a 'prompt' string or a 'messages' list", path, lineno)
            yield lineno, record


def main_generate(args, *, load: Callable[[Any], Any] | None = None) -> int:
    if not args.prompt and not args.input:
        raise ConfigError("give --prompt TEXT (repeatable) or --input PROMPTS.jsonl")
    if args.prompt and args.input:
        raise ConfigError("give --prompt or --input, not both")
    check_generation_args(args)  # before the model is loaded: a bad flag should not cost a minute of loading
    records = [{"prompt": p} for p in args.prompt] if args.prompt else [r for _, r in _read_jsonl(Path(args.input))]
    loaded = _load(args, load)
    tok = loaded.tokenizer
    cfg = generation_config(loaded, args, default_max_new=256)

    def is_chat(record) -> bool:
        return "messages" in record or args.chat

    def prompt_ids(record) -> list[int]:
        if is_chat(record):
            messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
            if args.system and not any(m.get("role") == "system" for m in messages):
                messages = [{"role": "system", "content": args.system}] + messages
            return render_chat(tok, messages)
        return encode_prompt(tok, record["prompt"], loaded.add_bos)

    ids = [prompt_ids(r) for r in records]
    if any(is_chat(r) for r in records):
        cfg.stop_token_ids = sorted(stop_ids(loaded, chat=True))
    empty_plain = 0  # plain-text prompts answered with nothing: the symptom of a chat model fed raw text

    def timed(batch, **kw) -> list[Completion]:
        start = time.perf_counter()
        completions = generate(loaded.model, batch, cfg, tokenizer=tok, **kw)
        if not args.quiet:
            print(speed_line(completions, time.perf_counter() - start), file=sys.stderr, flush=True)
        return completions

    jsonl = args.input is not None or args.output is not None
    out: TextIO = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        if not jsonl and len(ids) == 1:  # one prompt: stream it
            completions = timed(ids, on_text=lambda _row, text: (out.write(text), out.flush()))
            out.write("\n")
            out.flush()
            empty_plain = int(not is_chat(records[0]) and not (completions[0].text or "").strip())
        else:
            for start in range(0, len(ids), args.batch_size):
                batch_records = records[start:start + args.batch_size]
                completions = timed(ids[start:start + args.batch_size])
                for record, c in zip(batch_records, completions):
                    empty_plain += not is_chat(record) and not (c.text or "").strip()
                    if jsonl:
                        row = dict(record, completion=c.text, finish_reason=c.finish_reason,
                                   completion_tokens=len(c.tokens))
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    else:
                        out.write(f"--- {record['prompt']}\n{c.text}\n")
                out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if empty_plain and tok.chat_template:
        print(CHAT_HINT, file=sys.stderr)
    if args.output:
        print(f"{len(records)} completions written to {args.output}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------------------------


class ChatSession:
    """A conversation with a model: each turn re-renders the history with the chat template and streams a reply."""

    def __init__(self, loaded, config: GenerationConfig, *, system: str | None = None):
        if loaded.tokenizer is None or loaded.tokenizer.chat_template is None:
            raise ForgelineError("this model's tokenizer has no chat template; `forgeline chat` needs one "
                                 "(use `forgeline generate` for plain completions)")
        self.loaded = loaded
        self.config = config
        self.config.stop_token_ids = sorted(stop_ids(loaded, chat=True))
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.last_completion: Completion | None = None  # of the latest reply, for its speed
        self.last_seconds = 0.0

    def reset(self) -> None:
        self.messages = []

    def _prompt(self, messages) -> list[int]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return render_chat(self.loaded.tokenizer, head + messages)

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        messages = self.messages + [{"role": "user", "content": user_text}]
        ids = self._prompt(messages)
        ctx = self.loaded.model.cfg.max_seq_len
        budget = ctx - min(self.config.max_new_tokens, ctx // 2)
        while len(ids) > budget and len(messages) > 1:  # drop the oldest exchange
            messages = messages[2:] if len(messages) > 2 else messages[1:]
            ids = self._prompt(messages)
        if len(ids) >= ctx:
            raise ForgelineError(f"the message is too long for the model's context ({len(ids)} >= {ctx} tokens)")
        start = time.perf_counter()
        completion = generate(self.loaded.model, [ids], self.config, tokenizer=self.loaded.tokenizer,
                              on_text=(lambda _row, t: on_text(t)) if on_text else None)[0]
        self.last_completion, self.last_seconds = completion, time.perf_counter() - start
        text = completion.text or ""
        self.messages = messages + [{"role": "assistant", "content": text.strip()}]
        return text


def main_chat(args, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
              stderr: TextIO | None = None, load: Callable[[Any], Any] | None = None) -> int:
    from .model.formats import describe

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    check_generation_args(args)
    loaded = _load(args, load)
    session = ChatSession(loaded, generation_config(loaded, args, default_max_new=512), system=args.system)
    stdout.write(f"forgeline chat: {describe(loaded)}\n{HELP}\n")
    stdout.flush()
    interactive = stdin is sys.stdin and stdout is sys.stdout
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        try:
            if interactive:
                line = input("\n> ") + "\n"
            else:
                stdout.write("\n> ")
                stdout.flush()
                line = stdin.readline()
        except (KeyboardInterrupt, EOFError):
            line = ""
        if not line:  # EOF (Ctrl-D) or Ctrl-C at the prompt
            stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            stdout.write("(conversation cleared)\n")
            continue
        if text == "/history":
            for m in session.messages:
                stdout.write(f"[{m['role']}] {m['content']}\n")
            stdout.write(f"({len(session.messages)} messages)\n")
            continue
        if text.startswith("/"):
            stdout.write(f"unknown command {text}; {HELP}\n")
            continue

        def show(delta: str) -> None:
            stdout.write(delta)
            stdout.flush()

        try:
            session.reply(text, on_text=show)
        except KeyboardInterrupt:
            stdout.write("\n(interrupted; this turn is dropped)\n")
            continue
        except ForgelineError as exc:
            stdout.write(f"\nerror: {exc}\n")
            continue
        stdout.write("\n")
        stdout.flush()
        if not args.quiet:
            stderr.write(speed_line([session.last_completion], session.last_seconds) + "\n")
            stderr.flush()
