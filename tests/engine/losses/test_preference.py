"""DPO losses and metrics against hand-computed values from fixed log-probabilities.

Three pairs, β = 0.1 unless stated:

    pair   π_c   π_r   ref_c  ref_r   π_c−ref_c  π_r−ref_r   h     βh
    0     −10   −14    −12    −13        2         −1        3    0.3
    1     −20   −15    −18    −16       −2          1       −3   −0.3
    2      −5    −7     −5     −7        0          0        0    0

Values used below: −log σ(0.3) = log(1 + e^−0.3) = 0.554355244468527,
−log σ(−0.3) = log(1 + e^0.3) = 0.854355244468527 (= 0.554355… + 0.3), −log σ(0) = log 2 =
0.693147180559945, σ(−0.3) = 0.425557483188341.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.losses.preference import (
    METRIC_NAMES,
    dpo_losses,
    dpo_metrics,
    implicit_rewards,
    log_ratio_difference,
    mean_metrics,
)
from tests.tolerances import assert_close

NLS_POS = 0.554355244468527   # −log σ(0.3)
NLS_NEG = 0.854355244468527   # −log σ(−0.3)
LOG2 = 0.693147180559945


def pairs(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    pc = torch.tensor([-10.0, -20.0, -5.0], dtype=torch.float64, requires_grad=requires_grad)
    pr = torch.tensor([-14.0, -15.0, -7.0], dtype=torch.float64, requires_grad=requires_grad)
    rc = torch.tensor([-12.0, -18.0, -5.0], dtype=torch.float64)
    rr = torch.tensor([-13.0, -16.0, -7.0], dtype=torch.float64)
    return pc, pr, rc, rr


def check(actual: torch.Tensor, expected: list[float], name: str) -> None:
    assert_close(actual, torch.tensor(expected, dtype=actual.dtype), torch.float32, name=name)


def test_log_ratio_difference():
    check(log_ratio_difference(*pairs()), [3.0, -3.0, 0.0], "h")


@pytest.mark.parametrize("loss_type, beta, eps, expected", [
    # −log σ(βh)
    ("sigmoid", 0.1, 0.0, [NLS_POS, NLS_NEG, LOG2]),
    # cDPO: 0.9·(−log σ(βh)) + 0.1·(−log σ(−βh)); pair 0: 0.9·0.554355 + 0.1·0.854355 = 0.584355
    ("sigmoid", 0.1, 0.1, [0.9 * NLS_POS + 0.1 * NLS_NEG, 0.9 * NLS_NEG + 0.1 * NLS_POS, LOG2]),
    # robust: (0.9·(−log σ(βh)) − 0.1·(−log σ(−βh))) / 0.8; pair 0: (0.498920 − 0.085436)/0.8 = 0.516855
    ("robust", 0.1, 0.1, [0.516855244468527, (0.9 * NLS_NEG - 0.1 * NLS_POS) / 0.8, 0.8 * LOG2 / 0.8]),
    ("robust", 0.1, 0.0, [NLS_POS, NLS_NEG, LOG2]),
    # IPO: (h − 1/(2β))² = (h − 5)²
    ("ipo", 0.1, 0.0, [4.0, 64.0, 25.0]),
    ("ipo", 0.25, 0.0, [1.0, 25.0, 4.0]),     # (h − 2)²
    # hinge: max(0, 1 − βh)
    ("hinge", 0.1, 0.0, [0.7, 1.3, 1.0]),
    ("hinge", 0.5, 0.0, [0.0, 2.5, 1.0]),
])
def test_losses_match_hand_computed_values(loss_type, beta, eps, expected):
    losses = dpo_losses(*pairs(), beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert losses.shape == (3,) and losses.dtype == torch.float32
    check(losses, expected, f"{loss_type} β={beta} ε={eps}")


def test_sigmoid_gradients():
    """∂ℓ/∂π_c = −β σ(−βh), ∂ℓ/∂π_r = +β σ(−βh); σ(−0.3) = 0.425557, σ(0.3) = 0.574443, σ(0) = ½."""
    pc, pr, rc, rr = pairs(requires_grad=True)
    dpo_losses(pc, pr, rc, rr, beta=0.1).sum().backward()
    sig = [0.425557483188341, 1 - 0.425557483188341, 0.5]
    check(pc.grad, [-0.1 * s for s in sig], "dℓ/dπ_c")
    check(pr.grad, [0.1 * s for s in sig], "dℓ/dπ_r")


def test_ipo_and_hinge_gradients():
    """IPO: ∂ℓ/∂π_c = 2(h − 1/(2β)) = [−4, −16, −10]; hinge: −β where 1 − βh > 0 else 0."""
    pc, pr, rc, rr = pairs(requires_grad=True)
    dpo_losses(pc, pr, rc, rr, beta=0.1, loss_type="ipo").sum().backward()
    check(pc.grad, [-4.0, -16.0, -10.0], "ipo dℓ/dπ_c")
    check(pr.grad, [4.0, 16.0, 10.0], "ipo dℓ/dπ_r")
    pc, pr, rc, rr = pairs(requires_grad=True)
    dpo_losses(pc, pr, rc, rr, beta=0.5, loss_type="hinge").sum().backward()
    check(pc.grad, [0.0, -0.5, -0.5], "hinge dℓ/dπ_c")


LENGTHS = dict(chosen_tokens=torch.tensor([5, 10, 0]), rejected_tokens=torch.tensor([7, 5, 1]))


def test_metrics_match_hand_computed_values():
    m = dpo_metrics(*pairs(), beta=0.1, **LENGTHS)
    assert tuple(m) == METRIC_NAMES
    check(m["rewards/chosen"], [0.2, -0.2, 0.0], "rewards/chosen")      # 0.1·(π_c − ref_c)
    check(m["rewards/rejected"], [-0.1, 0.1, 0.0], "rewards/rejected")  # 0.1·(π_r − ref_r)
    check(m["rewards/margins"], [0.3, -0.3, 0.0], "rewards/margins")
    check(m["rewards/accuracies"], [1.0, 0.0, 0.0], "rewards/accuracies")  # ties count as wrong
    check(m["logps/chosen"], [-10.0, -20.0, -5.0], "logps/chosen")
    check(m["logps/rejected"], [-14.0, -15.0, -7.0], "logps/rejected")
    check(m["logps/chosen_per_token"], [-2.0, -2.0, -5.0], "logps/chosen_per_token")  # an empty answer counts 1
    check(m["logps/rejected_per_token"], [-2.0, -3.0, -7.0], "logps/rejected_per_token")
    means = mean_metrics([dpo_metrics(*pairs(), beta=0.1, **LENGTHS)])
    expected = {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracies": 1 / 3,
                "rewards/margins": 0.0, "logps/chosen": -35 / 3, "logps/rejected": -12.0}
    for name, value in expected.items():
        assert math.isclose(means[name], value, abs_tol=1e-6), (name, means[name])


def test_mean_metrics_averages_over_all_pairs_of_all_batches():
    pc, pr, rc, rr = pairs()
    ct, rt = LENGTHS["chosen_tokens"], LENGTHS["rejected_tokens"]
    parts = [dpo_metrics(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.1, chosen_tokens=ct[:1], rejected_tokens=rt[:1]),
             dpo_metrics(pc[1:], pr[1:], rc[1:], rr[1:], beta=0.1, chosen_tokens=ct[1:], rejected_tokens=rt[1:])]
    assert math.isclose(mean_metrics(parts)["rewards/accuracies"], 1 / 3, abs_tol=1e-7)
    assert math.isclose(mean_metrics(parts)["rewards/chosen"], 0.0, abs_tol=1e-7)


def test_implicit_reward_is_beta_times_log_ratio():
    gen = torch.Generator().manual_seed(0)
    policy, ref = -50 * torch.rand(7, generator=gen), -50 * torch.rand(7, generator=gen)
    for beta in (0.1, 0.5, 2.0):
        assert_close(implicit_rewards(policy, ref, beta), beta * (policy - ref), torch.float32, name=f"β={beta}")
    policy.requires_grad_(True)
    assert not implicit_rewards(policy, ref, 0.1).requires_grad


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type="kto"), "expected one of"),
    (dict(beta=0.0), "beta must be positive"),
    (dict(label_smoothing=0.5), r"\[0, 0.5\)"),
    (dict(loss_type="ipo", label_smoothing=0.1), "sigmoid and robust"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_losses(*pairs(), **kwargs)
