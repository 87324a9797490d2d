"""Online reinforcement learning (GRPO, RLOO, PPO): the pieces a policy-gradient loop is built from.

Rewards (:mod:`.rewards`): built-in and user reward functions by name, weighted into one score, each batch scored
so that a failing function is reported, never silently turned into zeros.
"""

from .rewards import (
    BUILTIN_REWARDS,
    CombinedReward,
    PartScore,
    RewardError,
    RewardFunction,
    RewardResult,
    RewardSpec,
    UnitTestReward,
    build_reward,
    load_reward,
    parse_reward_specs,
    score_safely,
)

__all__ = [
    "BUILTIN_REWARDS",
    "CombinedReward",
    "PartScore",
    "RewardError",
    "RewardFunction",
    "RewardResult",
    "RewardSpec",
    "UnitTestReward",
    "build_reward",
    "load_reward",
    "parse_reward_specs",
    "score_safely",
]
