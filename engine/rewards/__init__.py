"""Reward functions for GRPO: built-in graders, loading ``--reward`` specs, scoring a batch.

    graders      exact, number, regex:PATTERN, json-schema:FILE (TRL's signature
                 ``f(prompts, completions, **columns) -> list[float]``)
    json_schema  the small JSON Schema validator behind json-schema:FILE
    loading      load_reward_functions(specs, weights, reward_model, reward_model_loader) -> RewardSet
    scoring      RewardSet.score -> RewardScores; reward_sums -> metrics_from_sums (TRL's metric names)
    errors       RewardError (an InputError: exit 2), SampleError (a grader's error about one sample)
"""

from engine.rewards.errors import RewardError, SampleError
from engine.rewards.loading import load_reward_functions
from engine.rewards.scoring import Reward, RewardScores, RewardSet, metrics_from_sums, reward_metrics, reward_sums

__all__ = ["Reward", "RewardError", "RewardScores", "RewardSet", "SampleError", "load_reward_functions",
           "metrics_from_sums", "reward_metrics", "reward_sums"]
