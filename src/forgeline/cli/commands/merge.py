"""`forgeline merge`: adapters folded into their base, written as a whole model directory."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("merge", help="fold LoRA/DoRA/QLoRA adapters into their base: a whole model dir (from an "
                                     "adapter dir, or a run or checkpoint trained with peft:)")
    p.add_argument("source", metavar="SOURCE", help="an adapter dir, or a run dir or checkpoint trained with peft: "
                                                    "(a run: its adapter/, else its newest intact checkpoint)")
    p.add_argument("out", nargs="?", metavar="OUT_DIR", help="the model dir to write (or --out)")
    p.add_argument("--out", dest="out_option", default=None, metavar="OUT_DIR", help="the same as OUT_DIR")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="the base model the adapters were trained on (default: the one the source records)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=merge)


def merge(args) -> int:
    from ...errors import ConfigError
    from ...recipes.adapted import merge_to_model_dir

    if args.out and args.out_option and args.out != args.out_option:
        raise ConfigError(f"two output directories given ({args.out} and --out {args.out_option}); give one")
    out = args.out or args.out_option
    if not out:
        raise ConfigError("give the model directory to write: forgeline merge SOURCE --out DIR")
    out, info, layers = merge_to_model_dir(args.source, out, base=args.base, overwrite=args.overwrite)
    print(f"{info.method} adapter merged into {info.base.path} ({layers} layers)\nforgeline model written to {out}")
    return 0
