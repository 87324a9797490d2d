"""`forgeline decontam --train DATA... --tasks ...`: which benchmark items appear in training data (13-gram overlap
and MinHash near duplicates), with a report per task."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("decontam", help="find benchmark items in training data (n-gram overlap, near duplicates)")
    p.add_argument("--train", nargs="+", required=True, metavar="PATH",
                   help="training data: text, JSONL, JSON, Parquet files, directories, token-shard datasets")
    p.add_argument("--tasks", required=True, help="comma-separated benchmark tasks (as forgeline eval takes them)")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH", help="a task's files (repeatable)")
    p.add_argument("--n", type=int, default=13, help="n-gram length in words (default 13)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="flag an item when this fraction of its n-grams is in the training data (default 0.5)")
    p.add_argument("--jaccard", type=float, default=0.8, help="near-duplicate threshold (default 0.8)")
    p.add_argument("--no-fuzzy", action="store_true", help="the n-gram check only (no MinHash; no datasketch needed)")
    p.add_argument("--out", default="decontam", help="report directory (default: decontam)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from ...eval.contamination import BenchmarkItem, check_contamination
    from ...eval.tasks import get_task
    from ...files import atomic_write_text
    from .evaluate import task_arguments

    tasks, data = task_arguments(args)
    items = []
    for name in tasks:
        task = get_task(name, path=data.get(name))
        items += [BenchmarkItem(task=name, item_id=doc.id, text=task.contamination_text(doc)) for doc in task.docs()]
    report = check_contamination(items, args.train, n=args.n, threshold=args.threshold, fuzzy=not args.no_fuzzy,
                                 jaccard=args.jaccard)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "contamination.json", json.dumps(report.to_dict(), indent=2) + "\n")
    markdown = report.to_markdown()
    atomic_write_text(out / "contamination.md", markdown)
    print(markdown.rstrip())
    print(f"report: {out / 'contamination.json'}, {out / 'contamination.md'}")
    return 0
