"""`forgeline demo`: the whole pre-training path on a laptop in a few minutes, with no files and no network.

It writes a corpus of short stories from a small grammar (thousands of distinct stories with a consistent
structure, so a tiny model visibly learns it), trains a BPE tokenizer on it, prepares token shards, pre-trains the
`tiny` preset and prints the loss curve and a sample. Every step is the real command's code path.
"""

from __future__ import annotations

import random
from pathlib import Path

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam", "Ella", "Jack", "Nora", "Finn"]
ANIMALS = ["cat", "dog", "bird", "rabbit", "fox", "bear", "duck", "frog", "mouse", "owl"]
PLACES = ["park", "garden", "forest", "river", "hill", "beach", "farm", "village", "meadow", "lake"]
OBJECTS = ["red ball", "shiny key", "small box", "blue kite", "old map", "big apple", "soft hat", "little boat"]
FEELINGS = ["happy", "sad", "scared", "curious", "tired", "excited", "proud", "surprised"]
ACTIVITIES = ["play", "run", "sing", "dance", "read", "jump", "swim", "draw"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "quiet"]


def story(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES, 2)
    animal, place, obj = rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(OBJECTS)
    feeling, activity, weather = rng.choice(FEELINGS), rng.choice(ACTIVITIES), rng.choice(WEATHER)
    lines = [
        f"Once upon a time, there was a little {animal} named {name}.",
        f"{name} liked to {activity} in the {place} every day.",
        f"One {weather} morning, {name} found a {obj} near the {place}.",
        f"{name} felt {feeling} and ran to show it to {friend}.",
    ]
    ending = rng.choice([
        f"{friend} smiled and said, \"Let us {activity} together!\"",
        f"{friend} said, \"The {obj} is yours, {name}.\"",
        f"They took the {obj} home and played until the sun went down.",
        f"{name} and {friend} became best friends.",
    ])
    lines.append(ending)
    lines.append("The end.")
    return " ".join(lines)


def write_corpus(path: Path, n_stories: int = 6000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(story(rng) for _ in range(n_stories)) + "\n", encoding="utf-8")
    return path


def run_demo(out: Path, *, steps: int = 200) -> None:
    from ..config import PretrainConfig, validate_config
    from ..data import prepare_dataset
    from ..tokenizer import train_bpe
    from .pretrain import pretrain

    out = Path(out)
    corpus = write_corpus(out / "stories.txt")
    print(f"[1/4] wrote a corpus of generated stories to {corpus} ({corpus.stat().st_size / 1e6:.1f} MB)")
    tokenizer = train_bpe([corpus], vocab_size=512, output_dir=out / "tokenizer", show_progress=False)
    print(f"[2/4] trained a byte-level BPE tokenizer with {tokenizer.vocab_size} tokens -> {out / 'tokenizer'}")
    prepare_dataset([corpus], tokenizer=tokenizer, output_dir=out / "data", val_fraction=0.02, overwrite=True,
                    show_progress=False)
    print(f"[3/4] tokenized it into shards -> {out / 'data'}")
    run_dir = out / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cfg = validate_config(PretrainConfig, {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny"},
        "data": {"dataset": str(out / "data"), "seq_len": 128},
        "train": {"max_steps": steps, "micro_batch_size": 16, "lr": 2e-3, "warmup_steps": min(30, steps // 4),
                  "precision": "bf16", "weight_decay": 0.1},
        "checkpoint": {"every": max(1, steps // 2), "keep_last": 1},
        "monitor": {"val_every": max(1, steps // 3), "val_batches": 8, "sample_prompt": "Once upon a time,",
                    "progress": True},
    }, source="demo")
    print(f"[4/4] pre-training the tiny model for {steps} steps (run dir {run_dir})")
    outcome = pretrain(cfg)
    history = [h for h in outcome.result.history if "loss" in h]
    marks = sorted({0, len(history) // 4, len(history) // 2, 3 * len(history) // 4, len(history) - 1})
    print("\nloss curve:")
    for i in marks:
        h = history[i]
        print(f"  step {h['step']:>5}  loss {h['loss']:.3f}")
    if outcome.result.final_eval:
        print(f"validation loss {outcome.result.final_eval['val_loss']:.3f} "
              f"(perplexity {outcome.result.final_eval['val_ppl']:.2f})")
    from ..model.inference.generate import sample

    prompt = "Once upon a time,"
    ids = sample(outcome.model, outcome.tokenizer.encode(prompt, add_bos=True), max_new_tokens=60, temperature=0.7,
                 top_k=40, stop_ids={outcome.tokenizer.eos_id}, seed=0)
    print(f"\nsample: {prompt}{outcome.tokenizer.decode(ids, skip_special_tokens=True)}")
    print(f"\nmodel saved to {outcome.model_dir}")
