"""Scoring a batch of completions with a set of weighted reward functions, and the reward metrics.

`RewardSet.score` calls every function ONCE per batch with all N completions (each prompt repeated
for each of its completions, the data columns likewise) and checks what comes back: one finite
number per completion, as a list, a tuple or a 1-D array / tensor. Numbers are ints, floats,
numpy or 0-d torch scalars; booleans count as 1.0 / 0.0 (``[c == a for …]`` is a natural grader).
None, strings, NaN and infinities are refused: each failure is a `RewardError` naming the function
and the sample (its record's ``file:line`` and the first 80 characters of its completion). A
function that raises `SampleError(i, …)` is reported with sample i, any other exception with the
batch's first sample.

    total_i = Σ_f w_f · r_f,i                        (N,) fp32, the reward of completion i

Metrics (`reward_metrics`, TRL's names): ``rewards/<name>/mean`` and ``rewards/<name>/std`` of
each function's unweighted rewards over the batch (std Bessel-corrected; 0 for one completion),
``reward`` (the mean total), ``reward_std`` (the mean over groups of the within-group std of the
total, G = ``num_generations`` completions per group, in group order) and
``frac_reward_zero_std`` (the fraction of groups whose totals are all equal: no learning signal).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.rewards.errors import RewardError, SampleError
from engine.rewards.graders import completion_text

RESERVED_COLUMNS = frozenset({"prompts", "completions"})  # the two positional arguments
FLOAT32_MAX = torch.finfo(torch.float32).max  # rewards are kept in fp32


@dataclass(frozen=True)
class Reward:
    """One reward function: its metric ``name`` (unique in the set), the callable, its weight, the
    ``spec`` it came from (``--reward`` value, or ``--reward-model PATH``) and the data columns it needs."""

    name: str
    fn: Callable[..., object]
    weight: float
    spec: str
    required_columns: frozenset[str] = frozenset()


@dataclass
class RewardScores:
    """``total`` (N,) fp32 = Σ_f w_f·r_f; ``per_function`` name → (N,) fp32 unweighted rewards."""

    total: torch.Tensor
    per_function: dict[str, torch.Tensor]


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (the report is one line)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def _preview(completion: object) -> str:
    try:
        text = completion_text(completion)
    except TypeError:
        text = str(completion)
    return repr(text[:80] + ("…" if len(text) > 80 else ""))


@dataclass
class RewardSet:
    """The reward functions of a run, in ``--reward`` order then the reward model."""

    rewards: list[Reward]

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def weights(self) -> list[float]:
        return [r.weight for r in self.rewards]

    def required_columns(self) -> set[str]:
        """The data columns some function needs (e.g. {"answer"} for exact / number)."""
        return set().union(*(r.required_columns for r in self.rewards))

    def score(self, prompts: list, completions: list, columns: dict[str, list], sources: list[str]) -> RewardScores:
        """Every function on the N completions; ``prompts``, ``sources`` (``file:line`` of each
        completion's record) and each column are aligned with ``completions``."""
        n = len(completions)
        lengths = {"prompts": len(prompts), "sources": len(sources)} | {k: len(v) for k, v in columns.items()}
        if any(length != n for length in lengths.values()):
            raise ValueError(f"reward inputs not aligned with the {n} completions: {lengths}")
        if clash := RESERVED_COLUMNS & set(columns):
            raise ValueError(f"columns {sorted(clash)} clash with the reward-function arguments")
        per_function = {}
        for reward in self.rewards:
            if missing := sorted(reward.required_columns - set(columns)):
                raise RewardError(f"reward {reward.name} ({reward.spec}) needs the data column(s) "
                                  f"{', '.join(missing)}; the records of {sources[0] if sources else 'the data'} "
                                  f"have: {', '.join(sorted(columns)) or 'none'}")
            per_function[reward.name] = self._call(reward, prompts, completions, columns, sources)
        total = torch.zeros(n, dtype=torch.float64)
        for reward in self.rewards:
            total += reward.weight * per_function[reward.name].double()
        return RewardScores(total.float(), per_function)

    def _call(self, reward: Reward, prompts: list, completions: list, columns: dict[str, list],
              sources: list[str]) -> torch.Tensor:
        def fail(what: str, i: int = 0, which: str = "sample") -> RewardError:
            sample = f"{which} {sources[i]} (completion {_preview(completions[i])})" if completions else "no samples"
            return RewardError(f"reward {reward.name} ({reward.spec}) {what}; {sample}")

        try:  # copies: a function that mutates its arguments cannot affect the next one
            result = reward.fn(list(prompts), list(completions), **{k: list(v) for k, v in columns.items()})
        except SampleError as err:
            raise fail(f"failed: {one_line(err)}", err.index if 0 <= err.index < len(completions) else 0) from err
        except Exception as err:
            which = "first sample of the batch" if len(completions) > 1 else "sample"
            raise fail(f"raised {type(err).__name__}: {one_line(err)}", 0, which) from err
        values = _as_list(result)
        if values is None:
            raise fail(f"returned {type(result).__name__}, expected a list of {len(completions)} numbers")
        if len(values) != len(completions):
            raise fail(f"returned {len(values)} values for {len(completions)} completions")
        out = []
        for i, v in enumerate(values):
            if getattr(v, "shape", None) == () and callable(getattr(v, "item", None)):
                v = v.item()  # a numpy scalar or a 0-d tensor
            if v is None:
                raise fail("returned None (return 0.0 for a completion it does not apply to)", i)
            if not isinstance(v, numbers.Real):
                raise fail(f"returned {type(v).__name__} {str(v)[:40]!r}, expected a number", i)
            if not math.isfinite(v) or abs(v) > FLOAT32_MAX:
                raise fail(f"returned {v}, expected a finite number (in float32 range)", i)
            out.append(float(v))
        return torch.tensor(out, dtype=torch.float32)


def _as_list(result: object) -> list | None:
    """A list, a tuple, or a 1-D tensor / array (anything with ``ndim == 1`` and ``tolist``) as a
    list; None for anything else."""
    if isinstance(result, (list, tuple)):
        return list(result)
    if getattr(result, "ndim", None) == 1 and callable(getattr(result, "tolist", None)):
        return result.tolist()
    return None


def _std(x: torch.Tensor) -> torch.Tensor:
    return x.std() if x.numel() > 1 else torch.zeros((), dtype=x.dtype)


def reward_sums(scores: list[RewardScores], num_generations: int) -> torch.Tensor:
    """What the reward metrics need, summed over batches (and, by the caller, over ranks): (6 + 2F,)
    float64 [n, Σ total, Σ total², Σ group std, groups, groups with zero std, then Σ r_f, Σ r_f² of
    each function]."""
    g = num_generations
    rows = []
    for s in scores:
        total = s.total.double()
        if g < 1 or total.numel() % g:
            raise ValueError(f"{total.numel()} rewards do not split into groups of num_generations={g}")
        groups = total.view(-1, g)
        group_std = groups.std(dim=1) if g > 1 else torch.zeros(groups.shape[0], dtype=total.dtype)
        zero_std = (groups == groups[:, :1]).all(dim=1)
        row = [total.numel(), total.sum(), total.square().sum(), group_std.sum(), groups.shape[0], zero_std.sum()]
        for values in s.per_function.values():
            row += [values.double().sum(), values.double().square().sum()]
        rows.append(torch.tensor([float(v) for v in row], dtype=torch.float64))
    return torch.stack(rows).sum(0)


def metrics_from_sums(sums: list[float], names: list[str], prefix: str = "") -> dict[str, float]:
    """TRL's reward metrics (module docstring) from `reward_sums`, each name prefixed with ``prefix``."""
    n, total, squares, group_std, groups, zero_std, *per_function = sums

    def std(s: float, sq: float) -> float:  # Bessel-corrected, 0 for one value
        return math.sqrt(max(sq - s * s / n, 0.0) / (n - 1)) if n > 1 else 0.0

    metrics = {}
    for i, name in enumerate(names):
        s, sq = per_function[2 * i], per_function[2 * i + 1]
        metrics[f"{prefix}rewards/{name}/mean"] = s / n
        metrics[f"{prefix}rewards/{name}/std"] = std(s, sq)
    metrics[f"{prefix}reward"] = total / n
    metrics[f"{prefix}reward_std"] = group_std / max(groups, 1)
    metrics[f"{prefix}frac_reward_zero_std"] = zero_std / max(groups, 1)
    return metrics


def reward_metrics(scores: RewardScores, num_generations: int) -> dict[str, float]:
    """TRL's reward metrics of one batch (definitions in the module docstring), as floats."""
    return metrics_from_sums(reward_sums([scores], num_generations).tolist(), list(scores.per_function))
