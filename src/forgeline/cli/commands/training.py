"""What every training command shares: a stage config, `--resume[=auto]`, `--nproc N` (torchrun on this machine),
`--print-config`, and one line at the end saying where the model is."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

from ..args import add_config_args, load_command_config, parse_resume
from ..launch import relaunch


def add_training_command(sub, name: str, *, help: str, schema, example: str, run: Callable, check: Callable) -> None:
    """`run(cfg, resume)` trains and returns an outcome with `model_dir`; `check(cfg, nproc)` validates what can be
    validated before torchrun starts any process (the layout against the world size, the data's presence)."""
    # no abbreviations: `--res` would dodge the --resume rewrite and swallow the next word
    p = sub.add_parser(name, help=help, allow_abbrev=False)
    add_config_args(p, schema, example)
    p.add_argument("--resume", nargs="?", type=parse_resume, default=False, metavar="auto",
                   help="--resume: continue from the run's latest intact checkpoint (an error if there is none); "
                        "--resume=auto: continue if there is one, else start fresh (for requeued jobs)")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (runs torchrun; default 1)")
    p.add_argument("--print-config", action="store_true", help="print the fully resolved config before training "
                                                               "(it is always written to run_dir/config.yaml)")

    def command(args: argparse.Namespace) -> int:
        cfg = load_command_config(schema, args.items, name)
        if args.nproc > 1 and "RANK" not in os.environ:
            check(cfg, args.nproc)  # a bad layout is one error, before any process starts
            return relaunch(args)
        if int(os.environ.get("RANK", "0")) == 0:
            from ...config import dump_config

            if args.print_config:
                print("resolved config:\n" + dump_config(cfg), flush=True)
            else:
                print(f"resolved config: {Path(cfg.run_dir) / 'config.yaml'} (--print-config prints it)", flush=True)
        outcome = run(cfg, args.resume)
        if int(os.environ.get("RANK", "0")) == 0 and outcome.model_dir is not None:
            print(f"model saved to {outcome.model_dir}")
        return 0

    p.set_defaults(func=command)
