"""`forgeline generate` and `forgeline chat`: text from any model forgeline loads, adapted ones included (an adapter
dir, or a run or checkpoint trained with peft:, on its base: forgeline.recipes.adapted)."""

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


def load(args):
    """The model to generate with; adapters merged for decoding (or kept, with bottleneck adapters), said in one line
    on stderr unless --quiet."""
    import sys

    from ...recipes.adapted import load_for_generation

    report = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    return load_for_generation(args.model, base=args.base, dtype=args.dtype, report=report)


def generate(args) -> int:
    from ...chat import main_generate

    return main_generate(args, load=load)


def chat(args) -> int:
    from ...chat import main_chat

    return main_chat(args, load=load)
