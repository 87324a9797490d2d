"""What the real-data preference examples share: held-out pairs scored by a reward model, and a policy's summed
log-probs of each pair's chosen and rejected response (for implicit rewards and pairwise preference rates)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_common import SHARED, smollm2_gguf, wilson  # noqa: E402,F401


def tokenized_pairs(model_path, files: list[Path], *, max_length: int, max_prompt_length: int):
    """The pairs of `files` rendered with the model's chat template, as the preference stages tokenize them."""
    import torch

    from forgeline.data.chat_templates import load_chat_template
    from forgeline.data.preference import load_preference_data
    from forgeline.model.formats import load_model

    loaded = load_model(model_path, dtype=torch.float32)
    template = load_chat_template(loaded.tokenizer, "model")
    pairs, _ = load_preference_data(files, template, max_length=max_length, max_prompt_length=max_prompt_length,
                                    kind="pairs")
    return loaded, pairs


def pair_logps(model, pairs, *, batch_size: int = 8, precision: str = "bf16"):
    """(chosen, rejected) summed response log-probs of every pair under `model` (one concatenated forward a batch)."""
    import torch

    from forgeline.data.preference_batches import collate_pairs
    from forgeline.objectives.preference import response_logps
    from forgeline.train.executor import autocast_context

    chosen, rejected = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            part = pairs[i:i + batch_size]
            batch = collate_pairs(part, 0, index=list(range(len(part))), weight=[1.0] * len(part))
            with autocast_context(torch.device("cpu"), precision):
                logps = response_logps(model, batch["input_ids"], batch["targets"])[0].float()
            chosen += logps[:len(part)].tolist()
            rejected += logps[len(part):].tolist()
    return torch.tensor(chosen), torch.tensor(rejected)


def rate(successes: float, n: int) -> dict:
    low, high = wilson(successes, n)
    return {"rate": successes / n, "ci95": [low, high], "n": n}


def fmt(r: dict) -> str:
    return f"{r['rate']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}] (n={r['n']})"


__all__ = ["SHARED", "fmt", "math", "pair_logps", "rate", "smollm2_gguf", "tokenized_pairs", "wilson"]
