"""`forgeline tokenizer train` and `forgeline data prepare`: a tokenizer and token shards from text files."""

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
