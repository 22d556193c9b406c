"""RewardSet.score: weighted totals, every malformed result named by function and sample, metrics."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from engine.rewards import RewardError, SampleError, load_reward_functions, reward_metrics
from engine.rewards.scoring import Reward, RewardScores, RewardSet
from tests.tolerances import assert_close

PROMPTS = ["What is 6 x 7?"] * 2 + ["What is 2 + 2?"] * 2
COMPLETIONS = ["It is 42.", "41", "4", "The sum is 4, of course, " + "and a long tail " * 10]
COLUMNS = {"answer": ["42", "42", "4", "4"]}
SOURCES = ["data.jsonl:1", "data.jsonl:1", "data.jsonl:2", "data.jsonl:2"]


def score_with(fn, name="custom"):
    rs = RewardSet([Reward(name, fn, 1.0, f"--reward mod:{name}")])
    return rs.score(PROMPTS, COMPLETIONS, COLUMNS, SOURCES)


def test_weighted_total_and_per_function():
    rs = load_reward_functions(["number", "regex:sum", "exact"], [1.0, 0.5, -2.0])
    scores = rs.score(PROMPTS, COMPLETIONS, COLUMNS, SOURCES)
    number, regex, exact = [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]
    assert {k: v.tolist() for k, v in scores.per_function.items()} == {"number": number, "regex": regex,
                                                                        "exact": exact}
    expected = [n + 0.5 * r - 2.0 * e for n, r, e in zip(number, regex, exact)]
    assert scores.total.dtype == torch.float32
    assert_close(scores.total, torch.tensor(expected), name="total")


def test_each_function_is_called_once_with_all_completions_and_columns():
    calls = []

    def spy(prompts, completions, **columns):
        calls.append((list(prompts), list(completions), dict(columns)))
        completions.append("mutated")  # a copy: the next function sees the original
        return [0.0] * 4

    rs = RewardSet([Reward("spy", spy, 1.0, "s"), Reward("spy2", spy, 1.0, "s")])
    rs.score(PROMPTS, COMPLETIONS, COLUMNS, SOURCES)
    assert len(calls) == 2 and calls[1] == (PROMPTS, COMPLETIONS, COLUMNS)


@pytest.mark.parametrize("result", [[1, 0.5, True, np.float32(0.25)], (0, 1, 2, 3), torch.tensor([1.0, 0, 0, 0]),
                                    np.array([0.0, 1.0, 2.0, 3.0]), [torch.tensor(1.0)] * 4, [np.bool_(True)] * 4])
def test_accepted_results(result):
    values = score_with(lambda prompts, completions, **c: result).per_function["custom"]
    expected = torch.tensor([float(v) for v in (result.tolist() if hasattr(result, "tolist") else result)])
    assert_close(values, expected, name="values")


@pytest.mark.parametrize("result, message, sample", [
    ([1.0, None, 0.0, 0.0], r"returned None \(return 0.0 for a completion it does not apply to\)", 1),
    ([1.0, 0.0, "0.5", 0.0], r"returned str '0.5', expected a number", 2),
    ([1.0, 0.0, 0.0, math.nan], r"returned nan, expected a finite number", 3),
    ([-math.inf, 0.0, 0.0, 0.0], r"returned -inf, expected a finite number", 0),
    ([0.0, 1e39, 0.0, 0.0], r"returned 1e\+39, expected a finite number \(in float32 range\)", 1),
    ([[1.0], 0.0, 0.0, 0.0], r"returned list '\[1.0\]', expected a number", 0),
    ([1.0, 0.0], r"returned 2 values for 4 completions", 0),
    (0.5, r"returned float, expected a list of 4 numbers", 0),
    (torch.zeros(4, 1), r"returned Tensor, expected a list of 4 numbers", 0),
])
def test_bad_results_name_the_function_and_the_sample(result, message, sample):
    with pytest.raises(RewardError, match=r"^reward custom \(--reward mod:custom\) " + message) as info:
        score_with(lambda prompts, completions, **c: result)
    text = str(info.value)
    assert f"sample {SOURCES[sample]} (completion {COMPLETIONS[sample][:80]!r}"[:-1] in text
    assert "\n" not in text


def test_a_raising_function_names_the_batch_or_the_sample():
    def boom(prompts, completions, **columns):
        raise ValueError("bad score\nsecond line")

    with pytest.raises(RewardError, match=r"^reward custom \(.*\) raised ValueError: bad score; first sample of the "
                                          r"batch data.jsonl:1 \(completion 'It is 42.'\)$"):
        score_with(boom)

    def about_one(prompts, completions, **columns):
        raise SampleError(3, "cannot parse")

    with pytest.raises(RewardError, match=r"failed: cannot parse; sample data.jsonl:2 \(completion 'The sum is 4, "
                                          r"of course, and a long tail and a long tail .*…'\)$"):
        score_with(about_one)


def test_a_bad_answer_names_its_sample():
    rs = load_reward_functions(["number"], None)
    with pytest.raises(RewardError, match=r"reward number \(--reward number\) failed: answer 'four' is not a "
                                          r"number; sample data.jsonl:2 \(completion '4'\)"):
        rs.score(PROMPTS, COMPLETIONS, {"answer": ["42", "42", "four", "4"]}, SOURCES)


def test_missing_column_and_misaligned_inputs():
    rs = load_reward_functions(["exact"], None)
    with pytest.raises(RewardError, match=r"reward exact \(--reward exact\) needs the data column\(s\) answer; "
                                          r"the records of data.jsonl:1 have: topic"):
        rs.score(PROMPTS, COMPLETIONS, {"topic": ["x"] * 4}, SOURCES)
    with pytest.raises(ValueError, match="not aligned"):
        rs.score(PROMPTS[:3], COMPLETIONS, COLUMNS, SOURCES)
    with pytest.raises(ValueError, match="clash"):
        rs.score(PROMPTS, COMPLETIONS, COLUMNS | {"completions": [1] * 4}, SOURCES)


def test_chat_completions():
    chat = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    scores = load_reward_functions(["exact", "number"], None).score(prompts, chat, COLUMNS, SOURCES)
    assert scores.total.tolist() == [1.0, 0.0, 2.0, 1.0]


def test_reward_metrics():
    total = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0])      # G = 2: groups (1, 0), (.5, .5), (2, 0)
    per = {"a": torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0]), "b": torch.tensor([0.0, 0.0, -0.5, -0.5, 1.0, 0.0])}
    m = reward_metrics(RewardScores(total, per), num_generations=2)
    s2 = math.sqrt(0.5)   # Bessel-corrected std of (1, 0)
    expected = {"rewards/a/mean": 4 / 6, "rewards/a/std": statistics.stdev([1, 0, 1, 1, 1, 0]),
                "rewards/b/mean": 0.0, "rewards/b/std": statistics.stdev([0, 0, -0.5, -0.5, 1, 0]),
                "reward": 4 / 6, "reward_std": (s2 + 0.0 + 2 * s2) / 3, "frac_reward_zero_std": 1 / 3}
    assert m.keys() == expected.keys()
    for k, v in expected.items():
        assert math.isclose(m[k], v, rel_tol=1e-6, abs_tol=1e-7), (k, m[k], v)
    one = reward_metrics(RewardScores(torch.tensor([1.0]), {"a": torch.tensor([1.0])}), num_generations=1)
    assert one["rewards/a/std"] == 0.0 and one["reward_std"] == 0.0
    with pytest.raises(ValueError, match="groups"):
        reward_metrics(RewardScores(total, per), num_generations=4)
