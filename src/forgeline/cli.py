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
    """One optional CONFIG.yaml anywhere among key=value overrides (the overrides win whatever the order)."""
    configs = [item for item in items if "=" not in item]
    if len(configs) > 1:
        raise ForgelineError(f"unexpected argument {configs[1]!r}: give at most one CONFIG.yaml (already have "
                             f"{configs[0]!r}); everything else must be key=value overrides")
    return (Path(configs[0]) if configs else None), [item for item in items if "=" in item]


# (schema, an example override of that command, sections listed in its help: None = all)
def _config_schemas() -> dict[str, tuple[type, str, tuple[str, ...] | None]]:
    from .config import DataPrepareConfig, PretrainConfig, TokenizerTrainConfig

    return {
        "pretrain": (PretrainConfig, "train.lr=3e-4", None),
        "tokenizer train": (TokenizerTrainConfig, "vocab_size=8192", None),
        "data prepare": (DataPrepareConfig, "val_fraction=0.01", None),
        "plan memory": (PretrainConfig, "parallel.tp=8", ("model", "data", "train", "parallel")),
    }


def add_config_args(parser: argparse.ArgumentParser, command: str) -> None:
    """The [CONFIG.yaml] key=value positionals, and a help epilog listing every key of the command's schema."""
    import textwrap

    from .config import describe_keys

    schema, example, sections = _config_schemas()[command]
    parser.add_argument("items", nargs="*", metavar="[CONFIG.yaml] key=value",
                        help=f"a YAML config and/or dotted overrides such as {example} (keys below)")
    keys = describe_keys(schema, sections=sections)
    lines = [textwrap.fill(k, width=118, initial_indent="  ", subsequent_indent="      ") for k in keys]
    what = "" if sections is None else f" (the pretrain config's {', '.join(sections)} sections)"
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


def _rewrite_optional_values(argv: list[str]) -> list[str]:
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


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .config import PretrainConfig, dump_config, load_config
    from .train.pretrain import pretrain

    config, overrides = _split_config_and_overrides(args.items)
    if config is None and not overrides:
        raise ForgelineError("forgeline pretrain needs a CONFIG.yaml (see recipes/) and/or key=value overrides")
    cfg = load_config(PretrainConfig, config, overrides)
    if args.nproc > 1 and "RANK" not in os.environ:
        return _launch_torchrun(cfg, args)
    if int(os.environ.get("RANK", "0")) == 0:
        if args.print_config:
            print("resolved config:\n" + dump_config(cfg), flush=True)
        else:
            print(f"resolved config: {Path(cfg.run_dir) / 'config.yaml'} (--print-config prints it)", flush=True)
    outcome = pretrain(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"model saved to {outcome.model_dir}")
    return 0


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """The same pretrain command under torchrun, every flag in the form this parser reads back."""
    flags = []
    if args.resume is True:
        flags.append("--resume")
    elif args.resume:
        flags.append(f"--resume={args.resume}")
    if args.print_config:
        flags.append("--print-config")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            "-m", "forgeline", "pretrain", *args.items, *flags]


def _launch_torchrun(cfg, args: argparse.Namespace) -> int:
    """`forgeline pretrain ... --nproc N`: check the layout here, then run the same command under torchrun on this
    machine (multi-node: call torchrun yourself, see docs/distributed.md)."""
    import subprocess

    from .data import load_index
    from .train.pretrain import check_parallel_config

    check_parallel_config(cfg, args.nproc)  # a bad layout is one error, before any process starts
    load_index(cfg.data.dataset)
    return subprocess.run(torchrun_command(args)).returncode


def cmd_export_consolidate(args: argparse.Namespace) -> int:
    from .parallel.checkpoint import consolidate

    out = consolidate(Path(args.checkpoint), Path(args.out), tokenizer_dir=Path(args.tokenizer) if args.tokenizer
                      else None, overwrite=args.overwrite)
    print(f"consolidated model written to {out}")
    return 0


def cmd_plan_memory(args: argparse.Namespace) -> int:
    from .parallel.memory import main_plan_memory

    return main_plan_memory(args)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .config import TokenizerTrainConfig, load_config
    from .tokenizer import train_bpe

    config, overrides = _split_config_and_overrides(args.items)
    cfg = load_config(TokenizerTrainConfig, config, overrides)
    # tokenizers' progress bar draws blank lines when stderr is not a terminal; the summary line below is enough
    tok = train_bpe(cfg.inputs, vocab_size=cfg.vocab_size, output_dir=cfg.output, text_field=cfg.text_field,
                    text_separator=cfg.text_separator, min_frequency=cfg.min_frequency,
                    model_max_length=cfg.model_max_length, show_progress=False)
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


def cmd_import(args: argparse.Namespace) -> int:
    from .model.hf import describe, load_hf, save_forgeline_dir

    src = Path(args.source)
    out = Path(args.out) if args.out else Path(f"{src.stem if args.format == 'gguf' else src.name}-forgeline")
    if args.format == "gguf":
        from .model.gguf import load_gguf

        loaded = load_gguf(src, dtype=args.dtype)
    else:
        loaded = load_hf(src, dtype=args.dtype)
    save_forgeline_dir(loaded, out, overwrite=args.overwrite)
    print(f"imported {describe(loaded)}\nforgeline model written to {out}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from .model.hf import export_hf
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    out = export_hf(args.source, args.out, tokenizer=tokenizer, architecture=args.architecture, dtype=args.dtype,
                    max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"Hugging Face model written to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .chat import main_generate

    return main_generate(args)


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import main_chat

    return main_chat(args)


def _add_interop_commands(sub) -> None:
    from .chat import add_generation_args

    imp = sub.add_parser("import", help="convert a Hugging Face dir or a GGUF file into a forgeline model dir")
    imp_sub = imp.add_subparsers(dest="format", required=True)
    for fmt, what in (("hf", "a Hugging Face Llama/Mistral/Qwen2 directory"), ("gguf", "a llama.cpp .gguf file")):
        p = imp_sub.add_parser(fmt, help=f"import {what}")
        p.add_argument("source", metavar="DIR" if fmt == "hf" else "FILE")
        p.add_argument("out", nargs="?", metavar="OUT_DIR", help="default: ./<name>-forgeline")
        p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
        p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
        p.set_defaults(func=cmd_import)
    exp = sub.add_parser("export", help="export a model to another format").add_subparsers(dest="format",
                                                                                            required=True)
    p = exp.add_parser("hf", help="write a transformers-loadable directory from a run, a checkpoint of any layout "
                                  "(sharded DCP included) or a model dir")
    p.add_argument("source", metavar="RUN_OR_CKPT")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--dtype", default=None, help="stored dtype (default: the model's)")
    p.add_argument("--max-shard-size", default="5GB", help="split the weights past this size (default 5GB)")
    p.add_argument("--architecture", default=None, help="LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM "
                                                        "(default: the source's, else Llama, Qwen2 with qkv_bias)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir, when the checkpoint has none beside it")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=cmd_export_hf)
    p = exp.add_parser("consolidate", help="one safetensors model dir from a checkpoint of any layout (sharded DCP "
                                           "checkpoints included)")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint (run_dir/checkpoints/step_N) or a run dir (its "
                                                      "newest checkpoint)")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the one the run used)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=cmd_export_consolidate)

    p = sub.add_parser("generate", help="complete prompts (--prompt ... or --input prompts.jsonl)")
    add_generation_args(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--input", default=None, help="JSONL with a 'prompt' string or 'messages' list per line")
    p.add_argument("--output", default=None, help="write JSONL completions here (default: stdout)")
    p.add_argument("--chat", action="store_true", help="wrap each --prompt as a user message in the chat template")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model in the terminal (/reset, /exit)")
    add_generation_args(p)
    p.set_defaults(func=cmd_chat)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgeline", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"forgeline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="pre-train a tiny model on a corpus built on the spot (no files, no network)")
    p.add_argument("--out", default="forgeline-demo", help="where the demo writes its run (default: ./forgeline-demo)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.set_defaults(func=cmd_demo)

    # no abbreviations: `--res` would dodge the --resume rewrite and swallow the next word
    p = sub.add_parser("pretrain", help="pre-train a model on token shards", allow_abbrev=False)
    add_config_args(p, "pretrain")
    p.add_argument("--resume", nargs="?", type=parse_resume, default=False, metavar="auto",
                   help="--resume: continue from the run's latest complete checkpoint (an error if there is none); "
                        "--resume=auto: continue if there is one, else start fresh (for requeued jobs)")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (runs torchrun; default 1)")
    p.add_argument("--print-config", action="store_true", help="print the fully resolved config before training "
                                                               "(it is always written to run_dir/config.yaml)")
    p.set_defaults(func=cmd_pretrain)

    plan = sub.add_parser("plan", help="planning commands").add_subparsers(dest="action", required=True)
    p = plan.add_parser("memory", help="per-rank memory of a model preset under a parallel layout")
    from .parallel.memory import add_plan_memory_args

    add_plan_memory_args(p)
    p.set_defaults(func=cmd_plan_memory)

    tok = sub.add_parser("tokenizer", help="tokenizer commands").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer (inputs=[...] output=DIR vocab_size=N)")
    add_config_args(p, "tokenizer train")
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="data commands").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="tokenize text/JSONL/Parquet into token shards (inputs=[...] tokenizer=DIR "
                                        "output=DIR)")
    add_config_args(p, "data prepare")
    p.set_defaults(func=cmd_data_prepare)
    _add_interop_commands(sub)
    return parser


def _subcommands(parser: argparse.ArgumentParser):
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options, CONFIG.yaml and key=value overrides in any order (`pretrain run.yaml --resume train.lr=1e-3`).

    argparse stops filling a positional list at the first option, so the command's own parser is found first and
    then reads the rest with parse_intermixed_args (which cannot run on a parser that has subcommands).
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    node, path, i = parser, {}, 0
    while (subs := _subcommands(node)) is not None:
        if i >= len(argv) or argv[i] not in subs.choices:
            return parser.parse_args(argv)  # no or unknown command, --help, --version: argparse's own messages
        path[subs.dest] = argv[i]
        node = subs.choices[argv[i]]
        i += 1
    return node.parse_intermixed_args(_rewrite_optional_values(argv[i:]), namespace=argparse.Namespace(**path))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
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
