"""`forgeline label create|add-annotator|serve|export`: human comparisons of model responses (forgeline.label)."""

from __future__ import annotations

import sys


def register(sub) -> None:
    label = sub.add_parser("label", help="collect human comparisons of model responses in a local web app, export "
                                         "them as preference pairs")
    commands = label.add_subparsers(dest="label_command", required=True)

    p = commands.add_parser("create", help="a new project: prompts and two or more models (responses generated "
                                           "here), or --responses with the candidates already written")
    p.add_argument("db", metavar="DB", help="the label database (an SQLite file; made if absent)")
    p.add_argument("--name", required=True, help="the project's name (one database holds many projects)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="JSONL with a 'prompt' string or a 'messages' list per line, or a .txt file with one prompt "
                        "per line")
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                   help="a model to generate a response with (repeat: two or more); named by its path unless "
                        "NAME= is given")
    p.add_argument("--responses", default=None, metavar="FILE",
                   help="instead of --prompts/--model: JSONL with 'prompt' and 'responses': [{'model', 'text'}, ...]")
    p.add_argument("--annotators", default="", metavar="NAMES", help="comma-separated annotator names (more can "
                                                                     "be added later with add-annotator)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="at most this many new tokens per response "
                                                                   "(default 256)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature; 0 = greedy (default: "
                                                                   "the model's generation config, else greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens; 0 = no limit")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold, 0 < p <= 1")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 0; 1 = off")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible responses)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.set_defaults(func=create)

    p = commands.add_parser("add-annotator", help="add an annotator to a project and print their access token")
    p.add_argument("db", metavar="DB")
    p.add_argument("--project", required=True)
    p.add_argument("--name", required=True, help="the annotator's name")
    p.set_defaults(func=add_annotator)

    p = commands.add_parser("serve", help="the annotation web app (needs the label extra: pip install "
                                          "'forgeline[label]')")
    p.add_argument("db", metavar="DB")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this "
                                                       "machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port (printed)")
    p.set_defaults(func=serve)

    p = commands.add_parser("export", help="the answers as preference pairs (JSONL) and an agreement and win-rate "
                                           "report")
    p.add_argument("db", metavar="DB")
    p.add_argument("--project", required=True)
    p.add_argument("--out", required=True, metavar="FILE", help="preference pairs, one JSON object per line")
    p.add_argument("--report", default=None, metavar="FILE", help="also write the report as JSON here")
    p.set_defaults(func=export)


def _load_for_generation(path: str, dtype: str):
    # the loader `forgeline generate` uses: adapter dirs and runs trained with peft: work here too
    from ...recipes.adapted import load_for_generation

    return load_for_generation(path, dtype=dtype, report=lambda line: print(line, file=sys.stderr, flush=True))


def _print_tokens(tokens: dict[str, str]) -> None:
    if not tokens:
        return
    width = max(len(name) for name in tokens)
    print("access tokens (shown only now: the database keeps their hashes; give each annotator their own):")
    for name, token in tokens.items():
        print(f"  {name:<{width}}  {token}")


def create(args) -> int:
    from ...chat import check_generation_args
    from ...errors import ConfigError
    from ...label import create as making
    from ...label.store import create_project, open_database

    annotators = [name.strip() for name in args.annotators.split(",") if name.strip()]
    if len(set(annotators)) != len(annotators):
        raise ConfigError(f"--annotators names someone twice: {args.annotators}")
    settings: dict = {}
    if args.responses:
        if args.prompts or args.model:
            raise ConfigError("give --responses, or --prompts with --model; not both")
        items = making.read_candidates(args.responses)
        settings["source"] = {"responses": args.responses}
    else:
        if not args.prompts:
            raise ConfigError("give --prompts FILE with two or more --model PATH, or --responses FILE")
        models = making.parse_model_specs(args.model)
        check_generation_args(args)  # before a model is loaded
        prompts = making.read_prompts(args.prompts)
        items = making.generate_items(prompts, models, settings=args, prompts_path=args.prompts,
                                      load=_load_for_generation, batch_size=args.batch_size,
                                      report=making.print_stderr)
        settings["source"] = {"prompts": args.prompts, "models": dict(models)}
        settings["generation"] = {key: getattr(args, key) for key in (
            "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "seed", "dtype")}
    conn = open_database(args.db, create=True)
    try:
        tokens = create_project(conn, args.name, items, settings, annotators)
    finally:
        conn.close()
    models = sorted({model for item in items for model, _ in item.responses})
    print(f"project {args.name!r} created in {args.db}: {len(items)} items, responses from {', '.join(models)}")
    _print_tokens(tokens)
    if not tokens:
        print(f"no annotators yet: forgeline label add-annotator {args.db} --project {args.name} --name NAME")
    return 0


def add_annotator(args) -> int:
    from ...label.store import add_annotator as add, open_database

    conn = open_database(args.db)
    try:
        token = add(conn, args.project, args.name)
    finally:
        conn.close()
    print(f"annotator {args.name!r} added to project {args.project!r}")
    _print_tokens({args.name: token})
    return 0


def serve(args) -> int:
    from ...label.serve import serve as run

    return run(args.db, host=args.host, port=args.port)


def export(args) -> int:
    import json

    from ...files import atomic_write_text
    from ...label.export import export_project, report_lines
    from ...label.store import open_database

    conn = open_database(args.db)
    try:
        report = export_project(conn, args.project, args.out)
    finally:
        conn.close()
    print("\n".join(report_lines(report)))
    print(f"{report['pairs_written']} preference pairs written to {args.out}")
    if args.report:
        atomic_write_text(args.report, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print(f"report written to {args.report}")
    return 0
