"""Advantages from the rewards of groups of completions (n samples of each prompt, rows grouped prompt by prompt).

group (GRPO, Shao et al. 2024): A_i = r_i - mean(group), divided by the group's standard deviation (`scale`
    "group"), the whole batch's ("batch"), or not at all ("none": Dr. GRPO's advice, no question-difficulty bias).
    A group whose completions all score the same gets 0: it says nothing about which completion is better.
rloo (Ahmadian et al. 2024): A_i = r_i - the mean of the other n - 1 rewards of its group (an unbiased baseline),
    optionally standardised over the batch.
The standard deviations are the sample ones (n - 1), with 1e-4 added before dividing, as TRL computes them.
"""

from __future__ import annotations

import torch

EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group") -> torch.Tensor:
    grouped = _grouped(rewards, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if group_size > 1 else \
            torch.zeros_like(rewards)
        return advantages / (std + EPS)
    if scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        return advantages / (std + EPS)
    if scale == "none":
        return advantages
    raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")


def rloo_advantages(rewards: torch.Tensor, group_size: int, *, normalize: bool = False) -> torch.Tensor:
    if group_size < 2:
        raise ValueError("RLOO's leave-one-out baseline needs at least 2 samples per prompt")
    grouped = _grouped(rewards, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    advantages = (grouped - baseline).reshape(-1)
    if normalize:
        std = advantages.std() if advantages.numel() > 1 else advantages.new_zeros(())
        advantages = (advantages - advantages.mean()) / (std + EPS)
    return advantages


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)
