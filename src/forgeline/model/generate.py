"""Autoregressive sampling with a KV cache."""

from __future__ import annotations

import torch

from .transformer import Transformer


@torch.no_grad()
def sample(
    model: Transformer,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    seed: int | None = None,
) -> list[int]:
    """Continue one prompt: the prompt is run once to fill the cache, then one token per forward pass.

    temperature 0 is greedy. Returns the new tokens only (the stop token, when hit, included).
    """
    if not prompt_ids:
        raise ValueError("sample() needs at least one prompt token (e.g. the BOS id)")
    was_training = model.training
    model.eval()
    device = model.inv_freq.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    total = min(len(prompt_ids) + max_new_tokens, model.cfg.max_seq_len)
    prompt_ids = prompt_ids[-(total - 1):] if len(prompt_ids) >= total else prompt_ids
    cache = model.new_kv_cache(1, total)
    tokens = torch.tensor([prompt_ids], device=device)
    out: list[int] = []
    for _ in range(total - len(prompt_ids)):
        logits = model(tokens, kv_cache=cache)[0, -1].float()
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        out.append(next_id)
        if next_id in stop_ids:
            break
        tokens = torch.tensor([[next_id]], device=device)
    model.train(was_training)
    return out
