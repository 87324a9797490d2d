"""Scoring text with a model: perplexity over fixed windows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...errors import ForgelineError
from ..transformer import Transformer, require_lm_head

__all__ = ["perplexity"]


def perplexity(model: Transformer, token_ids: Sequence[int], *, window: int | None = None,
               batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens (default: the context length)."""
    require_lm_head(model, "compute a perplexity with")
    window = min(window or model.cfg.max_seq_len, model.cfg.max_seq_len)
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    n = (len(ids) - 1) // window
    if n == 0:
        raise ForgelineError(f"perplexity needs more than {window} tokens, got {len(ids)}")
    chunks = ids[: n * window + 1]
    inputs = chunks[:-1].view(n, window)
    targets = chunks[1:].view(n, window)
    total = 0.0
    device = model.inv_freq.device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            logits = model(inputs[i:i + batch_size].to(device)).float()
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets[i:i + batch_size].flatten().to(device), reduction="sum").item()
    model.train(was_training)
    return math.exp(total / (n * window))

