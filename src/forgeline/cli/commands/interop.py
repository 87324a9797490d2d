"""`forgeline import hf|gguf|peft` and `forgeline export hf|consolidate`: models (and adapters) in and out of other
formats."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    imp = sub.add_parser("import", help="convert a Hugging Face dir or a GGUF file into a forgeline model dir (or "
                                        "a PEFT adapter into a forgeline adapter dir)")
    imp_sub = imp.add_subparsers(dest="format", required=True)
    for fmt, what in (("hf", "a Hugging Face Llama/Mistral/Qwen2 directory"), ("gguf", "a llama.cpp .gguf file")):
        p = imp_sub.add_parser(fmt, help=f"import {what}")
        p.add_argument("source", metavar="DIR" if fmt == "hf" else "FILE")
        p.add_argument("out", nargs="?", metavar="OUT_DIR", help="default: ./<name>-forgeline")
        p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
        p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
        p.set_defaults(func=import_model)
    p = imp_sub.add_parser("peft", help="a PEFT LoRA/DoRA adapter dir (save_pretrained) onto a local base -> a "
                                        "forgeline adapter dir that generate, merge and export hf read without --base")
    p.add_argument("source", metavar="DIR", help="the PEFT adapter dir (adapter_config.json + "
                                                 "adapter_model.safetensors)")
    p.add_argument("out", nargs="?", metavar="OUT_DIR", help="default: ./<name>-forgeline (or --out)")
    p.add_argument("--out", dest="out_option", default=None, metavar="OUT_DIR", help="the same as OUT_DIR")
    p.add_argument("--base", required=True, metavar="MODEL",
                   help="the base model the adapter was trained on, as forgeline reads it (model dir, HF dir, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=import_peft)
    exp = sub.add_parser("export", help="export a model to another format").add_subparsers(dest="format",
                                                                                            required=True)
    p = exp.add_parser("hf", help="write a transformers-loadable directory from a run, a checkpoint of any layout "
                                  "(sharded DCP included), a model dir or adapters (merged; --adapter-only: PEFT's "
                                  "format)")
    p.add_argument("source", metavar="RUN_OR_CKPT")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--dtype", default=None, help="stored dtype (default: the model's)")
    p.add_argument("--max-shard-size", default="5GB", help="split the weights past this size (default 5GB)")
    p.add_argument("--architecture", default=None, help="LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM "
                                                        "(default: the source's, else Llama, Qwen2 with qkv_bias)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir, when the checkpoint has none beside it")
    p.add_argument("--adapter-only", action="store_true",
                   help="an adapter source (adapter dir, run or checkpoint trained with peft:): write the adapter "
                        "alone in PEFT's format instead of the merged model")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="the base model of an adapter source (default: the one it records)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=export_hf)
    p = exp.add_parser("consolidate", help="one safetensors model dir from a checkpoint of any layout (sharded DCP "
                                           "checkpoints included)")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint (run_dir/checkpoints/step_N) or a run dir (its "
                                                      "newest checkpoint)")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the one the run used)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=export_consolidate)


def import_model(args) -> int:
    from ...model.formats import describe
    from ...model.formats.hf import load_hf
    from ...model.formats.model_dir import save_imported

    src = Path(args.source)
    out = Path(args.out) if args.out else Path(f"{src.stem if args.format == 'gguf' else src.name}-forgeline")
    if args.format == "gguf":
        from ...model.formats.gguf import load_gguf

        loaded = load_gguf(src, dtype=args.dtype)
    else:
        loaded = load_hf(src, dtype=args.dtype)
    save_imported(loaded, out, overwrite=args.overwrite)
    print(f"imported {describe(loaded)}\nforgeline model written to {out}")
    return 0


def import_peft(args) -> int:
    from ...errors import ConfigError
    from ...recipes.adapted import import_peft_adapter

    if args.out and args.out_option and args.out != args.out_option:
        raise ConfigError(f"two output directories given ({args.out} and --out {args.out_option}); give one")
    out = Path(args.out or args.out_option or f"{Path(args.source).name}-forgeline")
    out, info = import_peft_adapter(args.source, args.base, out, overwrite=args.overwrite)
    print(f"imported a {info.method} adapter on {info.base.path} (weights sha256 {info.base.sha256[:12]}...)\n"
          f"forgeline adapter dir written to {out}")
    return 0


def export_hf(args) -> int:
    from ...errors import ConfigError
    from ...model.formats.hf import export_hf as export
    from ...recipes.adapted import export_adapter, export_merged_hf, find_adapters
    from ...tokenizer import Tokenizer

    found = find_adapters(args.source)
    if args.adapter_only:
        out, info = export_adapter(found or args.source, args.out, base=args.base, overwrite=args.overwrite)
        print(f"{info.method} adapter written to {out} in PEFT's format (base {info.base.path}); load it with "
              "peft.PeftModel.from_pretrained on the `forgeline export hf` of that base")
        return 0
    if found is None and args.base is not None:
        raise ConfigError(f"--base is the base model of adapters, and {args.source} holds none: it is a whole model")
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    options = dict(tokenizer=tokenizer, architecture=args.architecture, dtype=args.dtype,
                   max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    if found is not None:
        out, info = export_merged_hf(found, args.out, base=args.base, **options)
        print(f"{info.method} adapter merged into {info.base.path}; Hugging Face model written to {out}")
        return 0
    out = export(args.source, args.out, **options)
    print(f"Hugging Face model written to {out}")
    return 0


def export_consolidate(args) -> int:
    from ...parallel.checkpoint import consolidate

    out = consolidate(Path(args.checkpoint), Path(args.out), tokenizer_dir=Path(args.tokenizer) if args.tokenizer
                      else None, overwrite=args.overwrite)
    print(f"consolidated model written to {out}")
    return 0
