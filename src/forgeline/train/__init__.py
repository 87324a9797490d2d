"""The training loop and what it needs: optimizer, schedule, checkpoints, stability, monitoring, distributed."""
