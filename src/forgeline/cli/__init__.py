"""forgeline <command> [CONFIG.yaml] [key.sub=value ...]

One entry point for every stage. A user's mistake (bad config, missing or malformed file) is printed as one
message and exits with status 2; no traceback, because the traceback would point into forgeline, not at the
user's file. Commands live in cli/commands/, one module each.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import ForgelineError
from .args import rewrite_optional_values
from .launch import torchrun_command

__all__ = ["EXIT_USER_ERROR", "build_parser", "main", "parse_args", "torchrun_command"]

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    from .commands import COMMANDS

    parser = argparse.ArgumentParser(prog="forgeline", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"forgeline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def _subcommands(parser: argparse.ArgumentParser):
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options, CONFIG.yaml and key=value overrides in any order (`pretrain run.yaml --resume train.lr=1e-3`).

    argparse stops filling a positional list at the first option, so the command's own parser is found first and
    then reads the rest with parse_intermixed_args (which cannot run on a parser that has subcommands).
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    node, path, words, i = parser, {}, [], 0
    while (subs := _subcommands(node)) is not None:
        if i >= len(argv) or argv[i] not in subs.choices:
            # a command whose plain form is one of its subcommands (`rm CONFIG` is `rm train CONFIG`)
            default = node.get_default("default_subcommand") if node is not parser else None
            if default is None or i >= len(argv) or argv[i] in ("-h", "--help"):
                return parser.parse_args(argv)  # no or unknown command, --help, --version: argparse's own messages
            argv.insert(i, default)
            continue
        path[subs.dest] = argv[i]
        words.append(argv[i])
        node = subs.choices[argv[i]]
        i += 1
    args = node.parse_intermixed_args(rewrite_optional_values(argv[i:]), namespace=argparse.Namespace(**path))
    args.command_words = words  # what the torchrun relauncher runs again on every rank
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    try:
        return args.func(args)
    except ForgelineError as exc:
        print(f"forgeline: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("forgeline: interrupted", file=sys.stderr)
        return 130
