"""The one torchrun relauncher: `forgeline <training command> ... --nproc N` checks the config here, then runs the
same command under torchrun on this machine (multi-node: call torchrun yourself, see docs/distributed.md)."""

from __future__ import annotations

import argparse
import subprocess
import sys


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """The same command under torchrun, every flag in the form this parser reads back."""
    flags = []
    if args.resume is True:
        flags.append("--resume")
    elif args.resume:
        flags.append(f"--resume={args.resume}")
    if args.print_config:
        flags.append("--print-config")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            "-m", "forgeline", *args.command_words, *args.items, *flags]


def relaunch(args: argparse.Namespace) -> int:
    return subprocess.run(torchrun_command(args)).returncode
