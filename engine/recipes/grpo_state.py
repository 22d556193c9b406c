"""The rollouts GRPO keeps between the ``--num-iterations`` steps of one batch of prompts, as the
tensors of a checkpoint file and back, so that a run resumed between two of those steps trains on
the very completions, rewards and π_old log-probs the uninterrupted run did.

Per kept micro-batch k (in the order of the step): ``k.place`` [epoch, index] of its prompts in
the data order; ``k.completions`` (N, T_c) right-padded with -1 and ``k.lengths`` (N,);
``k.advantages`` (N,); ``k.reward`` (N,) and ``k.reward.<name>`` per function; ``k.old_logps`` and
``k.ref_logps`` (N, T_c) when the rollout has them. Texts, the training batch and the positions are
rebuilt from the token ids (deterministic).
"""

from __future__ import annotations

import torch

from engine.recipes.grpo_rollout import Rollout, Rollouts
from engine.rewards import RewardScores


def saved_rollouts(kept: dict[tuple[int, int], Rollout]) -> dict[str, torch.Tensor]:
    """The tensors of the kept rollouts (on the CPU), for `engine.run.checkpoint.save_checkpoint`'s extras."""
    out: dict[str, torch.Tensor] = {}
    for k, ((epoch, index), rollout) in enumerate(kept.items()):
        lengths = rollout.lengths
        completions = torch.full((len(lengths), max(lengths)), -1, dtype=torch.long)
        for i, c in enumerate(rollout.completions):
            completions[i, :len(c)] = torch.tensor(c)
        out[f"{k}.place"] = torch.tensor([epoch, index])
        out[f"{k}.completions"] = completions
        out[f"{k}.lengths"] = torch.tensor(lengths)
        out[f"{k}.advantages"] = rollout.advantages.detach().cpu()
        out[f"{k}.reward"] = rollout.scores.total.detach().cpu()
        for name, values in rollout.scores.per_function.items():
            out[f"{k}.reward.{name}"] = values.detach().cpu()
        for name in ("old_logps", "ref_logps"):
            value = getattr(rollout, name)
            if value is not None:
                out[f"{k}.{name}"] = value.detach().cpu()
    return out


def restore_rollouts(tensors: dict[str, torch.Tensor], rollouts: Rollouts, loader) -> dict[tuple[int, int], Rollout]:
    """The kept rollouts back from `saved_rollouts`' tensors, their prompts read from ``loader``
    (the run's `engine.data.prompts.StepRepeats`: its underlying loader numbers the batches)."""
    kept = {}
    k = 0
    while f"{k}.place" in tensors:
        epoch, index = tensors[f"{k}.place"].tolist()
        prompts = loader.loader.batch(epoch, index)
        lengths = tensors[f"{k}.lengths"].tolist()
        completions = [row[:n] for row, n in zip(tensors[f"{k}.completions"].tolist(), lengths)]
        per_function = {name: tensors[f"{k}.reward.{name}"] for name in rollouts.rewards.names}
        scores = RewardScores(tensors[f"{k}.reward"], per_function)
        kept[(epoch, index)] = rollouts.restore(prompts, completions, scores, tensors[f"{k}.advantages"],
                                                tensors.get(f"{k}.old_logps"), tensors.get(f"{k}.ref_logps"))
        k += 1
    return kept
