"""The preference stages: `forgeline rm CONFIG.yaml` (and `forgeline rm score MODEL --input pairs.jsonl`),
`forgeline dpo`, `forgeline orpo`, `forgeline kto` (recipes/rm.py, dpo.py, orpo.py, kto.py)."""

from __future__ import annotations

from .training import add_training_command

EXAMPLE = "data.train=[pairs.jsonl] init=runs/sft/model"


def register(sub) -> None:
    from ...config import DPOConfig, KTOConfig, ORPOConfig, RewardConfig

    rm = sub.add_parser("rm", help="reward model: train one on preference pairs (rm CONFIG.yaml), or score pairs "
                                   "with one (rm score MODEL --input pairs.jsonl)")
    rm.set_defaults(default_subcommand="train")
    rm_sub = rm.add_subparsers(dest="rm_command", required=True)
    add_training_command(rm_sub, "train", help="train a reward model (the default: forgeline rm CONFIG.yaml)",
                         schema=RewardConfig, example=EXAMPLE, run=_runner("rm"), check=_check("rm"))
    score = rm_sub.add_parser("score", help="rewards of preference pairs under a reward model, and its pairwise "
                                            "accuracy with a 95%% interval")
    score.add_argument("model", metavar="MODEL", help="a reward model: run_dir/model of forgeline rm, or a "
                                                      "transformers *ForSequenceClassification directory")
    score.add_argument("--input", required=True, help="preference data (JSONL/JSON/Parquet, any format rm trains "
                                                      "on)")
    score.add_argument("--out", default=None, help="JSONL of per-pair rewards (default: only the summary)")
    score.add_argument("--format", default="auto", choices=["auto", "pairs", "hh", "ranked"])
    score.add_argument("--template", default="auto", help="chat template the text is rendered with (default: the "
                                                          "model's)")
    score.add_argument("--max-length", type=int, default=1024)
    score.add_argument("--batch-size", type=int, default=8)
    score.set_defaults(func=_score)
    for name, schema, what in (("dpo", DPOConfig, "direct preference optimisation (loss_type sigmoid, ipo, hinge, "
                                                  "simpo) on preference pairs"),
                               ("orpo", ORPOConfig, "ORPO: SFT and preference alignment in one loss, no reference"),
                               ("kto", KTOConfig, "KTO on unpaired completions labelled desirable or not")):
        add_training_command(sub, name, help=what, schema=schema, example=EXAMPLE, run=_runner(name),
                             check=_check(name))


def _runner(stage: str):
    def run(cfg, resume):
        import importlib

        module = importlib.import_module(f"forgeline.recipes.{stage}")
        return getattr(module, stage)(cfg, resume=resume)
    return run


def _check(stage: str):
    def check(cfg, nproc: int) -> None:
        from ...data.sources import resolve_inputs
        from ...recipes.setup import check_parallel_config

        check_parallel_config(cfg, nproc, pipeline_ok=False, deepspeed_ok=False, stage=stage)
        resolve_inputs(cfg.data.train)
        if cfg.data.validation:
            resolve_inputs(cfg.data.validation)
    return check


def _score(args) -> int:
    from ...recipes.rm import score_file

    report = score_file(args.model, args.input, out=args.out, data_format=args.format, template=args.template,
                        max_length=args.max_length, batch_size=args.batch_size)
    print(report)
    return 0
