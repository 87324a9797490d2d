"""`forgeline tokenizer train` and `forgeline data prepare`: a tokenizer and token shards from text files;
`forgeline data synthetic`: seeded arithmetic data (RL prompts, SFT, preference pairs, pre-training text)."""

from __future__ import annotations

from ..args import add_config_args, load_command_config


def register(sub) -> None:
    from ...config import DataPrepareConfig, TokenizerTrainConfig

    tok = sub.add_parser("tokenizer", help="tokenizer commands").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer (inputs=[...] output=DIR vocab_size=N)")
    add_config_args(p, TokenizerTrainConfig, "vocab_size=8192")
    p.set_defaults(func=tokenizer_train)

    data = sub.add_parser("data", help="data commands").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="tokenize text/JSONL/Parquet into token shards (inputs=[...] tokenizer=DIR "
                                        "output=DIR)")
    add_config_args(p, DataPrepareConfig, "val_fraction=0.01")
    p.set_defaults(func=data_prepare)

    p = data.add_parser("synthetic", help="seeded arithmetic questions with verifiable answers (--kind rl, sft, "
                                          "preference or text)")
    p.add_argument("--kind", required=True, choices=("rl", "sft", "preference", "text"),
                   help="rl: {prompt, answer}; sft: chat messages; preference: {prompt, chosen, rejected}; text: "
                        "plain pre-training text, documents separated by a blank line")
    p.add_argument("--n", type=int, required=True, help="records (text: documents) to write")
    p.add_argument("--split", default="train", choices=("train", "test"),
                   help="train or test (held out: no question in common with train, whatever the seed; default "
                        "train)")
    p.add_argument("--seed", type=int, default=0, help="fixes every draw (default 0)")
    p.add_argument("--digits", type=int, default=2, help="digits per operand (default 2)")
    p.add_argument("--steps", type=int, default=1, help="operations per question: 2 gives '(12 + 7) x 3' (default 1)")
    p.add_argument("--ops", nargs="+", default=["+", "-", "x"], metavar="OP",
                   help="operations, from + - x (space- or comma-separated; default all three)")
    p.add_argument("--out", required=True, help="the file to write: .jsonl for records, .txt for text")
    p.set_defaults(func=data_synthetic)


def tokenizer_train(args) -> int:
    from ...config import TokenizerTrainConfig
    from ...tokenizer import train_bpe

    cfg = load_command_config(TokenizerTrainConfig, args.items, "tokenizer train", required=False)
    # tokenizers' progress bar draws blank lines when stderr is not a terminal; the summary line below is enough
    tok = train_bpe(cfg.inputs, vocab_size=cfg.vocab_size, output_dir=cfg.output, text_field=cfg.text_field,
                    text_separator=cfg.text_separator, min_frequency=cfg.min_frequency,
                    model_max_length=cfg.model_max_length, show_progress=False)
    print(f"tokenizer with {tok.vocab_size} tokens saved to {cfg.output}")
    return 0


def data_prepare(args) -> int:
    from ...config import DataPrepareConfig
    from ...data import prepare_dataset
    from ...tokenizer import Tokenizer

    cfg = load_command_config(DataPrepareConfig, args.items, "data prepare", required=False)
    index = prepare_dataset(
        cfg.inputs, tokenizer=Tokenizer.load(cfg.tokenizer), output_dir=cfg.output, text_field=cfg.text_field,
        text_separator=cfg.text_separator, val_fraction=cfg.val_fraction, shard_tokens=cfg.shard_tokens,
        seed=cfg.seed, overwrite=cfg.overwrite,
    )
    for split, info in index["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens, {info['documents']:,} documents, {len(info['shards'])} shard(s)")
    print(f"dataset written to {cfg.output}")
    return 0


def data_synthetic(args) -> int:
    from ...data.synthetic import Difficulty, write_synthetic

    ops = [op for item in args.ops for op in item.replace(",", " ").split()]
    difficulty = Difficulty(digits=args.digits, steps=args.steps, ops=tuple(ops))
    path = write_synthetic(args.out, args.kind, args.n, split=args.split, seed=args.seed, difficulty=difficulty)
    what = "documents" if args.kind == "text" else f"{args.kind} records"
    print(f"wrote {args.n} {what} ({args.split} split, seed {args.seed}) to {path}")
    return 0
