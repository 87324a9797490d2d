"""Next-token prediction: the pre-training objective and the base of SFT."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..train.distributed import unwrap

IGNORE_INDEX = -100


def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `targets` under logits `hidden @ weight.T`, ignoring IGNORE_INDEX positions.

    Logits are upcast to fp32 before the softmax: bf16 log-probabilities lose the small differences the loss
    is made of.
    """
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight)
    return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    hidden = model(batch["input_ids"], doc_ids=batch.get("doc_ids"), return_hidden=True)
    loss = cross_entropy_sum(hidden, unwrap(model).output.weight, batch["targets"])
    return loss, {}
