"""The one torchrun relauncher: `forgeline <training command> ... --nproc N` checks the config here, then runs the
same command under torchrun on this machine (multi-node: call torchrun yourself, see docs/distributed.md)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

# Preemption signals (recipes stop after the step with a checkpoint): torchrun passes on SIGTERM by default, SIGUSR1
# (Slurm's warning before a time limit) only when asked to.
FORWARDED = ("SIGTERM", "SIGUSR1")


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
            "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "-m", "forgeline", *args.command_words, *args.items, *flags]


def relaunch(args: argparse.Namespace) -> int:
    """Run torchrun and pass this process's preemption signals on to its ranks (a scheduler signals the command it
    started, which is this one). The ranks get them directly: each finishes its step, writes its part of the
    checkpoint and exits 0, and torchrun ends as after any clean run, where a signal to torchrun itself would
    still stop the ranks cleanly but end torchrun with a SignalException."""
    proc = subprocess.Popen(torchrun_command(args))

    def forward(signum, frame):
        ranks = _children(proc.pid)
        for pid in ranks or [proc.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {}
    for name in FORWARDED:
        sig = getattr(signal, name)
        previous[sig] = signal.signal(sig, forward)
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _children(pid: int) -> list[int]:
    """The processes `pid` started (Linux's /proc; empty where that is unavailable)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found += [int(c) for c in fh.read().split()]
    except OSError:
        return []
    return found
