"""The command registry: every module here adds its commands to the parser with `register(subparsers)`, in the
order `forgeline --help` lists them. A new command is a new module and one line below."""

from . import data, decontam, demo, evaluate, generate, interop, label, merge, plan, preference, pretrain, redteam, rl, rlaif, sft

COMMANDS = (demo, pretrain, sft, preference, rl, rlaif, evaluate, redteam, decontam, data, plan, merge, interop, generate, label)
