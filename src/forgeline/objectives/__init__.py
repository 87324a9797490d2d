"""Loss functions: each maps (model, batch) to (summed loss over the batch's targets, metrics)."""

from .causal_lm import causal_lm_loss

__all__ = ["causal_lm_loss"]
