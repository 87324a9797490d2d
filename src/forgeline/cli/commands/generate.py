"""`forgeline generate` and `forgeline chat`: text from any model forgeline loads."""

from __future__ import annotations


def register(sub) -> None:
    from ...chat import add_generation_args

    p = sub.add_parser("generate", help="complete prompts (--prompt ... or --input prompts.jsonl)")
    add_generation_args(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--input", default=None, help="JSONL with a 'prompt' string or 'messages' list per line")
    p.add_argument("--output", default=None, help="write JSONL completions here (default: stdout)")
    p.add_argument("--chat", action="store_true", help="wrap each --prompt as a user message in the chat template")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.set_defaults(func=generate)

    p = sub.add_parser("chat", help="chat with a model in the terminal (/reset, /exit)")
    add_generation_args(p)
    p.set_defaults(func=chat)


def generate(args) -> int:
    from ...chat import main_generate

    return main_generate(args)


def chat(args) -> int:
    from ...chat import main_chat

    return main_chat(args)
