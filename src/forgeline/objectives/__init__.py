"""Loss functions: each maps (model, batch) to (summed loss over the batch's targets, metrics)."""

from .causal_lm import causal_lm_loss, cross_entropy_sum

__all__ = ["causal_lm_loss", "cross_entropy_sum"]
