"""Loss-spike detection: the running mean the spike test compares against, and the decision rules.

Large runs diverge in two ways: a non-finite loss or gradient (one bad batch or an overflow) and a loss spike (the
loss jumps far above its trend, often from a handful of unlucky batches after many updates of slowly growing
instability). The first is handled by skipping that update. The second by rolling back to the last good checkpoint
and skipping the batches between it and the spike, as PaLM did: replaying the same data from the same weights tends
to reproduce the spike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import StabilityConfig
from ..errors import ForgelineError


@dataclass
class SpikeDetector:
    cfg: StabilityConfig
    mean: float | None = None  # bias-corrected exponential moving average of accepted losses
    _ema: float = 0.0
    _weight: float = 0.0
    observed: int = 0

    def is_spike(self, loss: float) -> bool:
        """True when `loss` is above spike_factor x the running mean (after a settling period)."""
        if self.mean is None or self.observed < self.cfg.warmup_steps:
            return False
        return loss > self.cfg.spike_factor * self.mean

    def update(self, loss: float) -> None:
        """Fold an accepted (non-spike, finite, positive) value into the running mean. Zero is left out: an RL step
        whose groups all scored alike has a gradient of exactly zero, and folding such steps in would pull the mean
        towards zero until an ordinary step looked like a spike."""
        if not math.isfinite(loss) or loss <= 0:
            return
        beta = self.cfg.ema_beta
        self._ema = beta * self._ema + (1 - beta) * loss
        self._weight = beta * self._weight + (1 - beta)
        self.mean = self._ema / self._weight
        self.observed += 1

    def state_dict(self) -> dict:
        return {"ema": self._ema, "weight": self._weight, "observed": self.observed}

    def load_state_dict(self, state: dict) -> None:
        self._ema, self._weight, self.observed = state["ema"], state["weight"], int(state["observed"])
        self.mean = self._ema / self._weight if self._weight > 0 else None


class TrainingDiverged(ForgelineError):
    """Raised when a run keeps spiking after the allowed number of rollbacks."""
