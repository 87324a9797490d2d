"""forgeline <command> [CONFIG.yaml] [key.sub=value ...]

One entry point for every stage. A user's mistake (bad config, missing or malformed file) is printed as one
message and exits with status 2; no traceback, because the traceback would point into forgeline, not at the
user's file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import ForgelineError

EXIT_USER_ERROR = 2


def _split_config_and_overrides(items: list[str]) -> tuple[Path | None, list[str]]:
    config, overrides = None, []
    for i, item in enumerate(items):
        if "=" in item:
            overrides.append(item)
        elif i == 0:
            config = Path(item)
        else:
            raise ForgelineError(f"unexpected argument {item!r}: give one CONFIG.yaml first, then key=value overrides")
    return config, overrides


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[CONFIG.yaml] key=value",
                        help="a YAML config and/or dotted overrides such as train.lr=3e-4")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .config import PretrainConfig, dump_config, load_config
    from .train.pretrain import pretrain

    config, overrides = _split_config_and_overrides(args.items)
    if config is None and not overrides:
        raise ForgelineError("forgeline pretrain needs a CONFIG.yaml (see recipes/) and/or key=value overrides")
    cfg = load_config(PretrainConfig, config, overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        print("resolved config:\n" + dump_config(cfg), flush=True)
    outcome = pretrain(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"model saved to {outcome.model_dir}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .config import TokenizerTrainConfig, load_config
    from .tokenizer import train_bpe

    config, overrides = _split_config_and_overrides(args.items)
    cfg = load_config(TokenizerTrainConfig, config, overrides)
    tok = train_bpe(cfg.inputs, vocab_size=cfg.vocab_size, output_dir=cfg.output, text_field=cfg.text_field,
                    min_frequency=cfg.min_frequency, model_max_length=cfg.model_max_length)
    print(f"tokenizer with {tok.vocab_size} tokens saved to {cfg.output}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .config import DataPrepareConfig, load_config
    from .data import prepare_dataset
    from .tokenizer import Tokenizer

    config, overrides = _split_config_and_overrides(args.items)
    cfg = load_config(DataPrepareConfig, config, overrides)
    index = prepare_dataset(
        cfg.inputs, tokenizer=Tokenizer.load(cfg.tokenizer), output_dir=cfg.output, text_field=cfg.text_field,
        text_separator=cfg.text_separator, val_fraction=cfg.val_fraction, shard_tokens=cfg.shard_tokens,
        seed=cfg.seed, overwrite=cfg.overwrite,
    )
    for split, info in index["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens, {info['documents']:,} documents, {len(info['shards'])} shard(s)")
    print(f"dataset written to {cfg.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgeline", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"forgeline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="pre-train a tiny model on a corpus built on the spot (no files, no network)")
    p.add_argument("--out", default="forgeline-demo", help="where the demo writes its run (default: ./forgeline-demo)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pretrain", help="pre-train a model on token shards")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    p.set_defaults(func=cmd_pretrain)

    tok = sub.add_parser("tokenizer", help="tokenizer commands").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer (inputs=[...] output=DIR vocab_size=N)")
    _add_config_args(p)
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="data commands").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="tokenize text/JSONL/Parquet into token shards (inputs=[...] tokenizer=DIR "
                                        "output=DIR)")
    _add_config_args(p)
    p.set_defaults(func=cmd_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ForgelineError as exc:
        print(f"forgeline: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("forgeline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
