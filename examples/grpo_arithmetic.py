"""GRPO on synthetic arithmetic: does online RL with a verifiable reward raise held-out exact match after SFT?

Everything comes from `forgeline data synthetic` (seeded; the held-out questions are disjoint from every training
split by question text) and runs through the CLI, as a user would run it:

    1. pre-training text (arithmetic facts and simple sentences), a BPE tokenizer on it, token shards
    2. `forgeline pretrain`: a small Llama-shaped model from scratch on that text
    3. `forgeline sft`: chat records "What is 37 + 48?" -> "85" (ChatML)
    4. `forgeline eval --tasks arithmetic --chat-template` on the held-out questions (greedy, exact match)
    5. `forgeline grpo`: prompts from the RL split, the `arithmetic` reward (1 for the right answer, else 0), groups
       of samples per prompt
    6. the same evaluation after GRPO, and `forgeline eval compare` (McNemar's exact test on the paired documents)

    OMP_NUM_THREADS=2 .venv/bin/python examples/grpo_arithmetic.py [--out runs/grpo-arithmetic] [--heldout 500]
        [--pretrain-steps 1500] [--sft-steps 600] [--grpo-steps 150]

The figures in docs/rl.md come from the defaults.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def forgeline(*args: str) -> None:
    started = time.perf_counter()
    print("$ forgeline " + " ".join(args), flush=True)
    if subprocess.run([sys.executable, "-m", "forgeline", *args]).returncode != 0:
        raise SystemExit(f"forgeline {args[0]} failed (its message is above)")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def exact_match(report: Path) -> dict:
    result = json.loads(report.read_text())["results"][0]
    return {"n": result["n"], **result["metrics"]["exact_match"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/grpo-arithmetic")
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--sft-steps", type=int, default=600)
    p.add_argument("--grpo-steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    forgeline("data", "synthetic", "--kind", "text", "--n", "30000", "--seed", str(args.seed),
              "--out", str(data / "text.txt"))
    forgeline("data", "synthetic", "--kind", "sft", "--n", "8000", "--seed", str(args.seed + 1),
              "--out", str(data / "sft.jsonl"))
    forgeline("data", "synthetic", "--kind", "rl", "--n", "4000", "--seed", str(args.seed + 2),
              "--out", str(data / "rl.jsonl"))
    forgeline("data", "synthetic", "--kind", "rl", "--split", "test", "--n", str(args.heldout),
              "--seed", str(args.seed + 3), "--out", str(data / "heldout.jsonl"))
    forgeline("tokenizer", "train", f"inputs=[{data / 'text.txt'}]", f"output={out / 'tokenizer'}", "vocab_size=512")
    forgeline("data", "prepare", f"inputs=[{data / 'text.txt'}]", f"tokenizer={out / 'tokenizer'}",
              f"output={data / 'shards'}", "val_fraction=0.01", "overwrite=true")
    model = ["model.dim=256", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=768",
             "model.max_seq_len=256"]
    quiet = ["monitor.progress=false", "monitor.tensorboard=false"]
    forgeline("pretrain", f"run_dir={out / 'pretrain'}", f"data.dataset={data / 'shards'}", "data.seq_len=128",
              *model, f"train.max_steps={args.pretrain_steps}", "train.micro_batch_size=32", "train.lr=3e-3",
              f"train.warmup_steps={min(50, args.pretrain_steps // 10)}", "checkpoint.every=100000", *quiet, "monitor.val_every=500")
    forgeline("sft", f"run_dir={out / 'sft'}", f"init={out / 'pretrain'}", f"data.train=[{data / 'sft.jsonl'}]",
              "data.template=chatml", f"train.max_steps={args.sft_steps}", "train.lr=1e-3", f"train.warmup_steps={min(20, args.sft_steps // 10)}",
              "train.global_batch_samples=32", "train.micro_batch_size=32", "checkpoint.every=100000", *quiet)
    evaluate = ["--tasks", "arithmetic", "--data", f"arithmetic={data / 'heldout.jsonl'}", "--chat-template",
                "--no-decontam"]
    forgeline("eval", str(out / "sft" / "model"), *evaluate, "--out", str(out / "eval-sft"))
    forgeline("grpo", f"run_dir={out / 'grpo'}", f"init={out / 'sft' / 'model'}", f"data.train=[{data / 'rl.jsonl'}]",
              "data.template=model", "rewards=[arithmetic]", "rollout.prompts_per_step=16",
              "rollout.samples_per_prompt=8", "rollout.max_new_tokens=8", "rollout.temperature=1.0",
              f"train.max_steps={args.grpo_steps}", "train.lr=2e-5", "train.micro_batch_size=64",
              "checkpoint.every=100000", *quiet)
    forgeline("eval", str(out / "grpo" / "model"), *evaluate, "--out", str(out / "eval-grpo"))
    forgeline("eval", "compare", str(out / "eval-sft"), str(out / "eval-grpo"), "--out", str(out / "compare.json"))

    before, after = exact_match(out / "eval-sft" / "report.json"), exact_match(out / "eval-grpo" / "report.json")
    rewards = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rewards if "reward" in r]
    k = max(1, len(rewards) // 10)
    print(f"\nheld-out exact match on {before['n']} questions (95% interval):")
    print(f"  after SFT:  {before['mean']:.3f} [{before['ci_low']:.3f}, {before['ci_high']:.3f}]")
    print(f"  after GRPO: {after['mean']:.3f} [{after['ci_low']:.3f}, {after['ci_high']:.3f}]")
    print(f"GRPO training reward: mean of the first {k} steps {sum(rewards[:k]) / k:.3f}, of the last {k} "
          f"{sum(rewards[-k:]) / k:.3f}; {time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
