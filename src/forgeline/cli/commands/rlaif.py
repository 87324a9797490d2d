"""`forgeline rlaif label`: preference pairs labelled by an AI judge (recipes/rlaif.py)."""

from __future__ import annotations


def register(sub) -> None:
    top = sub.add_parser("rlaif", help="AI feedback: label preference pairs with a judge model (rlaif label ...)")
    top.set_defaults(default_subcommand="label")
    rlaif_sub = top.add_subparsers(dest="rlaif_command", required=True)
    p = rlaif_sub.add_parser("label", help="a judge model orders pairs of responses (both orders, inconsistent "
                                           "verdicts left out) into preference data for rm / dpo")
    p.add_argument("--judge", required=True, metavar="MODEL", help="the judge: any model forgeline loads")
    p.add_argument("--out", required=True, help="preference JSONL {prompt, chosen, rejected, judge}")
    p.add_argument("--pairs", default=None, help="pairs to judge (any preference format); their chosen is compared "
                                                 "with the judge's verdicts (agreement)")
    p.add_argument("--policy", default=None, metavar="MODEL", help="sample two responses of this model per prompt")
    p.add_argument("--prompts", default=None, help="with --policy: JSONL/JSON/Parquet records with a 'prompt'")
    p.add_argument("--rubric", default=None, help="what makes a response better (text, or @FILE)")
    p.add_argument("--chat-template", action="store_true", help="ask the judge through its chat template")
    p.add_argument("--limit", type=int, default=None, help="only the first N pairs or prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ...errors import ConfigError
    from ...recipes.rlaif import label

    rubric = args.rubric
    if rubric is not None and rubric.startswith("@"):
        path = Path(rubric[1:])
        if not path.is_file():
            raise ConfigError(f"--rubric: {path} does not exist")
        rubric = path.read_text(encoding="utf-8")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    label(args.judge, args.out, pairs=args.pairs, policy=args.policy, prompts=args.prompts, rubric=rubric,
          chat=args.chat_template, limit=args.limit, max_new_tokens=args.max_new_tokens,
          temperature=args.temperature, seed=args.seed, batch_size=args.batch_size)
    return 0
