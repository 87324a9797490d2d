"""Next-token prediction: the pre-training objective and the base of SFT."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..kernels.cross_entropy import IGNORE_INDEX, cross_entropy_sum
from ..train.distributed import unwrap
from ..train.executor import LossOutput, batch_tokens

__all__ = ["IGNORE_INDEX", "causal_lm_loss"]


def causal_lm_loss(model: nn.Module, batch: dict[str, Any]) -> LossOutput:
    """Summed next-token loss over the batch's targets (`n_targets` of them). Packed rows carry doc_ids (attention kept within each
    document) and, for samples that must each start at position 0 (SFT), position_ids."""
    hidden = model(batch["input_ids"], doc_ids=batch.get("doc_ids"), position_ids=batch.get("position_ids"),
                   return_hidden=True)
    loss = cross_entropy_sum(hidden, unwrap(model).lm_head_weight(), batch["targets"])
    count = batch["n_targets"] if "n_targets" in batch else (batch["targets"] != IGNORE_INDEX).sum()
    return LossOutput(loss=loss, count=int(count), tokens=batch_tokens(batch))
