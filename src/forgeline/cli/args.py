"""Argument conventions every command shares: one optional CONFIG.yaml among key=value overrides (in any order,
with options anywhere), help listing the schema's keys, and the `--resume[=auto]` flag."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from ..errors import ForgelineError


def split_config_and_overrides(items: list[str]) -> tuple[Path | None, list[str]]:
    """One optional CONFIG.yaml anywhere among key=value overrides (the overrides win whatever the order)."""
    configs = [item for item in items if "=" not in item]
    if len(configs) > 1:
        raise ForgelineError(f"unexpected argument {configs[1]!r}: give at most one CONFIG.yaml (already have "
                             f"{configs[0]!r}); everything else must be key=value overrides")
    return (Path(configs[0]) if configs else None), [item for item in items if "=" in item]


def load_command_config(schema, items: list[str], command: str, *, required: bool = True):
    from ..config import load_config

    config, overrides = split_config_and_overrides(items)
    if required and config is None and not overrides:
        raise ForgelineError(f"forgeline {command} needs a CONFIG.yaml (see recipes/) and/or key=value overrides")
    return load_config(schema, config, overrides)


def add_config_args(parser: argparse.ArgumentParser, schema, example: str,
                    sections: tuple[str, ...] | None = None, what: str = "") -> None:
    """The [CONFIG.yaml] key=value positionals, and a help epilog listing every key of the schema (built from the
    schema itself, so the help can never list a key the config rejects, or miss one)."""
    from ..config import describe_keys

    parser.add_argument("items", nargs="*", metavar="[CONFIG.yaml] key=value",
                        help=f"a YAML config and/or dotted overrides such as {example} (keys below)")
    keys = describe_keys(schema, sections=sections)
    lines = [textwrap.fill(k, width=118, initial_indent="  ", subsequent_indent="      ") for k in keys]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    head = textwrap.fill(f"config keys{what}, set in CONFIG.yaml or as key=value on the command line (values are "
                         f"YAML, e.g. {example}):", width=118)
    parser.epilog = head + "\n" + "\n".join(lines)


# `--resume` alone means "must resume", `--resume=auto` "resume if possible"; argparse would let a bare `--resume`
# swallow the next word (`--resume run.yaml`), so the bare flag is rewritten into the `=` form before parsing.
RESUME_VALUES = ("auto",)


def parse_resume(value: str) -> bool | str:
    if value == "":
        return True
    if value in RESUME_VALUES:
        return value
    raise argparse.ArgumentTypeError(f"give it no value (continue from the latest checkpoint, fail if there "
                                     f"is none) or =auto (continue if there is a checkpoint, else start fresh); "
                                     f"got {value!r}")


def rewrite_optional_values(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return out + argv[i:]
        if token == "--resume":
            if i + 1 < len(argv) and argv[i + 1] in RESUME_VALUES:  # `--resume auto`, the space form
                out.append(f"--resume={argv[i + 1]}")
                i += 2
                continue
            token = "--resume="
        out.append(token)
        i += 1
    return out
