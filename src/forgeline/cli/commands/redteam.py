"""`forgeline redteam MODEL --judge JUDGE`: attack success rates by category (recipes/redteam.py)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("redteam", help="adversarial prompts by category, judged by a safety judge: attack success "
                                       "rates with 95%% intervals, before/after with --compare")
    p.add_argument("model", metavar="MODEL", help="the model to attack (anything forgeline loads)")
    p.add_argument("--judge", required=True, metavar="MODEL", help="the safety judge model")
    p.add_argument("--compare", default=None, metavar="MODEL_B", help="a second model on the same prompts")
    p.add_argument("--requests", default=None, help="HH-RLHF transcripts or preference pairs whose first user turn "
                                                    "is a request (default ../shared/data/hh-rlhf harmless-base)")
    p.add_argument("--n", type=int, default=50, help="requests (default 50), each in every category")
    p.add_argument("--categories", default=None, help="comma-separated: direct, role_play, instruction_override, "
                                                      "prompt_injection, encoding (default all)")
    p.add_argument("--judge-chat-template", action="store_true", help="ask the judge through its chat template")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="redteam", help="report directory (default ./redteam)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...errors import ConfigError
    from ...recipes.redteam import redteam

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    redteam(args.model, args.judge, args.out, compare=args.compare, requests_path=args.requests, n=args.n,
            categories=categories, chat=args.judge_chat_template, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size)
    return 0
