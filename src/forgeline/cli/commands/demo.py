"""`forgeline demo`: the built-in demo (no files, no network)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="pre-train a tiny model on a corpus built on the spot (no files, no network)")
    p.add_argument("--out", default="forgeline-demo", help="where the demo writes its run (default: ./forgeline-demo)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.set_defaults(func=command)


def command(args) -> int:
    from ...recipes.demo import run_demo

    run_demo(Path(args.out), steps=args.steps)
    return 0
