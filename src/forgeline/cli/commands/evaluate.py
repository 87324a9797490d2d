"""`forgeline eval MODEL --tasks ...`: benchmark scores with lm-evaluation-harness's prompts and scoring, a table on
the console, report.json and report.md (and a per-sample log) in --out."""

from __future__ import annotations


def register(sub) -> None:
    top = sub.add_parser("eval", help="benchmark a model (eval MODEL --tasks ...), or compare two evaluations "
                                      "(eval compare A B)")
    top.set_defaults(default_subcommand="run")
    eval_sub = top.add_subparsers(dest="eval_command", required=True)
    p = eval_sub.add_parser("run", help="benchmark a model: MMLU, HellaSwag, ARC, GSM8K, HumanEval, TruthfulQA")
    p.add_argument("model", metavar="MODEL", help="forgeline model dir, Hugging Face dir, .gguf file, checkpoint, "
                                                  "run dir or adapter dir")
    p.add_argument("--tasks", required=True, help="comma-separated: arc_easy, arc_challenge, hellaswag, mmlu, gsm8k, "
                                                  "gsm8k_cot, humaneval, truthfulqa_mc1, truthfulqa_mc2")
    p.add_argument("--base", default=None, help="the base model of an adapter dir (default: the one it records)")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="the benchmark's files for a task (default: ../shared/data's copy); repeatable")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=int, default=None, help="only the first N documents of each task")
    p.add_argument("--sample", type=int, default=None,
                   help="a stratified random sample of N documents per task, reported with its 95%% interval")
    p.add_argument("--seed", type=int, default=1234, help="few-shot and sample draws (default 1234)")
    p.add_argument("--batch-size", type=int, default=16, help="contexts per forward batch (default 16)")
    p.add_argument("--samples", type=int, default=1,
                   help="humaneval: completions per problem (> 1: sampled, pass@k for k in 1, 10, 100 up to it)")
    p.add_argument("--temperature", type=float, default=0.0, help="humaneval: sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=None, help="humaneval: nucleus sampling")
    p.add_argument("--chat-template", action="store_true",
                   help="prompts through the model's chat template, few-shot examples as turns (a chat model)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--out", default=None, help="report directory (default: eval-<model name>)")
    p.add_argument("--train-data", nargs="+", default=None, metavar="PATH",
                   help="check the documents against this training data and score the clean subset too (default: "
                        "the data a run directory's config names)")
    p.add_argument("--no-decontam", action="store_true", help="skip the contamination check")
    p.set_defaults(func=run)

    c = eval_sub.add_parser("compare", help="per-task differences of two evaluations with paired significance")
    c.add_argument("a", metavar="A", help="an evaluation directory (forgeline eval --out DIR)")
    c.add_argument("b", metavar="B", help="another, of the same tasks and documents")
    c.add_argument("--resamples", type=int, default=10000, help="paired-bootstrap resamples (default 10000)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default=None, help="write the comparison as JSON here")
    c.set_defaults(func=compare)


def compare(args) -> int:
    import json
    from pathlib import Path

    from ...eval.compare import compare_dirs, comparison_markdown
    from ...files import atomic_write_text

    rows = compare_dirs(args.a, args.b, resamples=args.resamples, seed=args.seed)
    print(comparison_markdown(rows, args.a, args.b).rstrip())
    if args.out:
        atomic_write_text(Path(args.out), json.dumps({"a": args.a, "b": args.b, "rows": rows}, indent=2) + "\n")
    return 0


def task_arguments(args) -> tuple[list[str], dict[str, str]]:
    """--tasks a,b,c and the repeatable --data TASK=PATH, as eval and decontam take them."""
    from ...errors import ConfigError

    data = {}
    for item in args.data:
        if "=" not in item:
            raise ConfigError(f"--data takes TASK=PATH, got {item!r}")
        task, path = item.split("=", 1)
        data[task.strip()] = path
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks names no task")
    return tasks, data


def run(args) -> int:
    import sys
    from pathlib import Path

    from ...eval.engine import RequestEngine
    from ...eval.run import add_contamination, evaluate, training_data_of, write_report
    from ...eval.tasks import get_task
    from ...recipes.adapted import load_for_generation

    tasks, data = task_arguments(args)
    loaded = load_for_generation(args.model, base=args.base, dtype=args.dtype,
                                 report=lambda line: print(line, file=sys.stderr, flush=True))
    engine = RequestEngine(loaded.model, loaded.tokenizer, batch_size=args.batch_size,
                           generation_config=loaded.generation_config)
    out = Path(args.out or f"eval-{Path(str(args.model).rstrip('/')).name}")
    out.mkdir(parents=True, exist_ok=True)
    options = {"humaneval": {"samples": args.samples, "temperature": args.temperature, "top_p": args.top_p}}
    results = evaluate(engine, tasks, data=data, num_fewshot=args.num_fewshot, limit=args.limit, sample=args.sample,
                       seed=args.seed, log_path=out / "samples.jsonl", task_options=options,
                       chat_template=args.chat_template, report=print)
    train_data = [] if args.no_decontam else (args.train_data or training_data_of(args.model))
    if train_data:
        print(f"contamination check against {', '.join(str(p) for p in train_data)}")
        tasks_again = [get_task(name, path=data.get(name), num_fewshot=args.num_fewshot, seed=args.seed,
                                **options.get(name, {})) for name in tasks]
        add_contamination(results, tasks_again, train_data, report=print)
    stats = engine.stats
    if stats.truncated:
        print(f"{stats.truncated} request(s) longer than the model's context were cut from the left")
    if stats.hit_max_tokens:
        print(f"{stats.hit_max_tokens} generation(s) stopped at their token limit, not at a stop string")
    settings = {"tasks": tasks, "num_fewshot": args.num_fewshot, "limit": args.limit, "sample": args.sample,
                "seed": args.seed, "dtype": args.dtype, "data": data, "chat_template": args.chat_template,
                "contamination_checked_against": [str(p) for p in train_data]}
    json_path, md_path = write_report(results, out, model=str(args.model), settings=settings,
                                      engine_stats={"requests": stats.requests, "contexts": stats.contexts,
                                                    "forward_tokens": stats.forward_tokens,
                                                    "truncated": stats.truncated,
                                                    "hit_max_tokens": stats.hit_max_tokens})
    print(md_path.read_text().split("\n", 2)[2].rstrip())
    print(f"report: {json_path}, {md_path}; per-sample log: {out / 'samples.jsonl'}")
    return 0
