"""GRPO / Dr. GRPO / RLOO math against a plain-Python reference (loops over completions and tokens).

Fixture: P = 2 prompts × G = 4 completions, T = 5, ragged masks (lengths 5, 3, 1, 4 | 2, 5, 0, 3:
one empty completion, to exercise max(T_i, 1)); old log-probs off by up to ±0.5 nats, so that the
ratio ρ = exp(logp − old) lands below 1 − ε and above 1 + ε (ε = 0.2) on tokens of both signs of A.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from engine.losses.policy import (
    LOSS_TYPES,
    PolicySums,
    group_advantages,
    kl_k3,
    policy_loss,
    sequence_kl_penalty,
)
from tests.tolerances import assert_close

F64 = torch.float64
G, T, EPS = 4, 5, 0.2
LENGTHS = [5, 3, 1, 4, 2, 5, 0, 3]
REWARDS = [1.0, 0.0, 0.5, 0.0, 0.2, 0.9, 0.4, 0.9]
MAX_LEN = 6


def fixture(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = len(LENGTHS)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    logps = -0.1 - 2.9 * torch.rand(n, T, generator=gen, dtype=F64)
    old = logps + (torch.rand(n, T, generator=gen, dtype=F64) - 0.5)
    ref = logps + 0.6 * (torch.rand(n, T, generator=gen, dtype=F64) - 0.5)
    return {"logps": logps, "old": old, "ref": ref, "mask": mask}


# ---- the reference: plain Python over floats / 0-d tensors ----

def ref_advantages(rewards: list[float], g: int, loss_type: str, eps: float = 1e-4) -> list[float]:
    out = []
    for p in range(len(rewards) // g):
        group = rewards[p * g:(p + 1) * g]
        mean, std = statistics.fmean(group), statistics.stdev(group)   # stdev: Bessel-corrected
        for i, r in enumerate(group):
            if max(group) == min(group):
                out.append(0.0)
            elif loss_type == "grpo":
                out.append((r - mean) / (std + eps))
            elif loss_type == "dr_grpo":
                out.append(r - mean)
            else:
                out.append(r - sum(x for j, x in enumerate(group) if j != i) / (g - 1))
    return out


def ref_loss(logps, old, ref, adv, mask, loss_type, beta, num_sequences, eps=EPS):
    """Loss and [tokens, low, high, region, Σk3] from loops; differentiable in ``logps`` entries."""
    total = torch.zeros((), dtype=F64)
    counts = [0, 0, 0, 0, 0.0]
    for i in range(mask.shape[0]):
        row, n, a = torch.zeros((), dtype=F64), 0, float(adv[i])
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                continue
            rho = torch.exp(logps[i, t] - float(old[i, t]))
            unclipped = rho * a
            r = rho.detach().item()
            clipped_value = min(max(r, 1 - eps), 1 + eps) * a
            clipped = rho * a if 1 - eps <= r <= 1 + eps else clipped_value   # a constant when clipped
            loss_t = -(unclipped if unclipped.detach().item() < clipped_value else clipped)
            d = float(ref[i, t]) - logps[i, t]
            k3 = torch.exp(d) - d - 1
            if beta > 0 and loss_type != "rloo":
                loss_t = loss_t + beta * k3
            low, high = r < 1 - eps and a < 0, r > 1 + eps and a > 0
            counts = [counts[0] + 1, counts[1] + low, counts[2] + high, counts[3] + (low or high),
                      counts[4] + k3.detach().item()]
            row, n = row + loss_t, n + 1
        total = total + (row if loss_type == "dr_grpo" else row / max(n, 1))
    denom = num_sequences * MAX_LEN if loss_type == "dr_grpo" else num_sequences
    return total / denom, torch.tensor(counts, dtype=F64)


def advantages_tensor(loss_type: str) -> torch.Tensor:
    return torch.tensor(ref_advantages(REWARDS, G, loss_type), dtype=F64)


# ---- advantages ----

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_group_advantages_match_reference(loss_type):
    rewards = [1.0, 0.0, 0.5, 0.0, 0.7, 0.7, 0.7, 0.7, -2.0, 3.0, 0.25, 1.0]   # middle group all equal
    got = group_advantages(torch.tensor(rewards, dtype=F64), G, loss_type)
    assert_close(got, torch.tensor(ref_advantages(rewards, G, loss_type), dtype=F64), name=loss_type)
    assert torch.equal(got[4:8], torch.zeros(4, dtype=F64))


def test_rloo_is_leave_one_out():
    r = torch.tensor([3.0, 1.0, 2.0], dtype=F64)
    assert_close(group_advantages(r, 3, "rloo"), torch.tensor([3 - 1.5, 1 - 2.5, 2 - 2.0], dtype=F64))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("g, value", [(2, 0.1), (3, 0.1), (4, 0.7), (5, 1e8 / 3)])
def test_all_equal_group_is_exactly_zero(loss_type, g, value):
    for dtype in (torch.float32, F64):
        adv = group_advantages(torch.full((2 * g,), value, dtype=dtype), g, loss_type)
        assert torch.equal(adv, torch.zeros_like(adv)), adv


def test_group_advantages_float32_and_errors():
    r = torch.tensor(REWARDS[:4], dtype=torch.bfloat16)
    assert group_advantages(r, 4, "grpo").dtype == torch.float32
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(4), 1, "grpo")
    with pytest.raises(ValueError, match="expected"):
        group_advantages(torch.zeros(6), 4, "grpo")
    with pytest.raises(ValueError, match="expected one of"):
        group_advantages(torch.zeros(4), 2, "ppo")


# ---- KL estimates ----

def test_kl_k3_matches_formula_and_is_nonnegative():
    f = fixture()
    got = kl_k3(f["logps"], f["ref"])
    expected = [[math.exp(r - p) - (r - p) - 1 for p, r in zip(pr, rr)]
                for pr, rr in zip(f["logps"].tolist(), f["ref"].tolist())]
    assert_close(got, torch.tensor(expected, dtype=F64), name="k3")
    assert (got >= 0).all()
    assert_close(kl_k3(f["logps"], f["logps"]), torch.zeros(len(LENGTHS), T, dtype=F64), name="k3(p, p)")


def test_sequence_kl_penalty_sums_completion_tokens():
    f = fixture()
    f["logps"][~f["mask"]] = float("nan")   # padding never counts
    expected = [sum(f["logps"][i, t].item() - f["ref"][i, t].item() for t in range(LENGTHS[i]))
                for i in range(len(LENGTHS))]
    got = sequence_kl_penalty(f["logps"].requires_grad_(), f["ref"], f["mask"])
    assert_close(got, torch.tensor(expected, dtype=F64), name="KL_seq")
    assert not got.requires_grad


# ---- the loss ----

def run_loss(f, loss_type, beta, rows=slice(None), num_sequences=len(LENGTHS), with_ref=True):
    logps = f["logps"][rows].clone().requires_grad_()
    adv = advantages_tensor(loss_type)[rows]
    loss, sums = policy_loss(logps, f["old"][rows], f["ref"][rows] if with_ref else None, adv, f["mask"][rows],
                             loss_type=loss_type, epsilon=EPS, beta=beta, max_completion_len=MAX_LEN,
                             num_sequences=num_sequences)
    loss.backward()
    return loss, sums, logps.grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_and_gradient_match_reference(loss_type, beta):
    f = fixture()
    loss, sums, grad = run_loss(f, loss_type, beta)
    logps = f["logps"].clone().requires_grad_()
    expected, counts = ref_loss(logps, f["old"], f["ref"], advantages_tensor(loss_type), f["mask"], loss_type,
                                beta, len(LENGTHS))
    expected.backward()
    assert_close(loss, expected, name=f"{loss_type} β={beta} loss")
    assert_close(grad, logps.grad, name=f"{loss_type} β={beta} ∂loss/∂logp")
    assert_close(sums.stacked(), counts, name="metric sums")
    assert loss.dtype == F64 and grad[~f["mask"]].abs().max() == 0


def test_fixture_clips_in_both_directions():
    _, sums, _ = run_loss(fixture(), "grpo", 0.0)
    assert 0 < sums.clip_low and 0 < sums.clip_high, sums
    assert sums.clip_region == sums.clip_low + sums.clip_high < sums.tokens == sum(LENGTHS)


def test_metrics_are_token_means():
    f = fixture()
    _, sums, _ = run_loss(f, "dr_grpo", 0.0)
    means = sums.means()
    m = f["mask"]
    assert_close(means["kl"], kl_k3(f["logps"], f["ref"])[m].mean(), name="kl")
    assert set(means) == {"kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}
    assert_close(means["clip_ratio/region_mean"], (sums.clip_region / sum(LENGTHS)), name="region")
    _, no_ref, _ = run_loss(f, "grpo", 0.0, with_ref=False)
    assert no_ref.kl is None and "kl" not in no_ref.means()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_shares_add_up_to_the_step(loss_type):
    f = fixture(seed=1)
    full, full_sums, full_grad = run_loss(f, loss_type, 0.04)
    a, a_sums, a_grad = run_loss(f, loss_type, 0.04, rows=slice(0, 3))
    b, b_sums, b_grad = run_loss(f, loss_type, 0.04, rows=slice(3, None))
    assert_close(a + b, full, name="Σ shares")
    assert_close(torch.cat([a_grad, b_grad]), full_grad, name="gradients")
    summed = PolicySums.from_stacked((a_sums + b_sums).stacked())
    assert_close(summed.stacked(), full_sums.stacked(), name="metric sums")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_gradient_identity_at_ratio_one(loss_type):
    """old = logp: ρ = 1, nothing clipped, ∂loss/∂logp_it = −A_i·w_it, loss = −Σ_it A_i·w_it."""
    f = fixture()
    f["old"] = f["logps"].clone()
    loss, sums, grad = run_loss(f, loss_type, 0.0)
    adv = advantages_tensor(loss_type)
    lengths = torch.tensor(LENGTHS, dtype=F64).clamp(min=1)
    n = len(LENGTHS)
    w = (torch.full((n,), 1.0 / (n * MAX_LEN), dtype=F64) if loss_type == "dr_grpo" else 1.0 / (n * lengths))
    expected = torch.where(f["mask"], -adv[:, None] * w[:, None], 0.0)
    assert_close(grad, expected, name="∂loss/∂logp")
    assert_close(loss, expected.sum(), name="loss at ρ = 1")
    assert sums.clip_region == 0


def test_padding_values_do_not_matter():
    f = fixture()
    clean = run_loss(f, "grpo", 0.04)
    pad = ~f["mask"]
    for key, value in (("logps", float("nan")), ("old", float("inf")), ("ref", -float("inf"))):
        f[key] = f[key].masked_fill(pad, value)
    dirty = run_loss(f, "grpo", 0.04)
    assert_close(dirty[0], clean[0], name="loss")
    assert_close(dirty[2], clean[2], name="gradient")
    assert_close(dirty[1].stacked(), clean[1].stacked(), name="sums")


def test_float32_inputs_agree_with_float64():
    f = fixture()
    loss64, _, grad64 = run_loss(f, "grpo", 0.04)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in f.items()}
    logps = f32["logps"].clone().requires_grad_()
    loss, _ = policy_loss(logps, f32["old"], f32["ref"], advantages_tensor("grpo").float(), f32["mask"],
                          loss_type="grpo", epsilon=EPS, beta=0.04, max_completion_len=MAX_LEN,
                          num_sequences=len(LENGTHS))
    loss.backward()
    assert loss.dtype == torch.float32
    assert_close(loss, loss64.float(), name="fp32 loss")
    assert_close(logps.grad, grad64.float(), name="fp32 gradient")


def test_option_errors():
    f = fixture()
    with pytest.raises(ValueError, match="reference log-probs"):
        run_loss(f, "grpo", 0.04, with_ref=False)
    run_loss(f, "rloo", 0.04, with_ref=False)   # rloo: the KL is in the reward, no reference needed here
    with pytest.raises(ValueError, match="expected one of"):
        run_loss(f, "ppo", 0.0)
    with pytest.raises(ValueError, match="epsilon"):
        policy_loss(f["logps"], f["old"], None, torch.zeros(8), f["mask"], loss_type="grpo", epsilon=0.0,
                    beta=0.0, max_completion_len=MAX_LEN, num_sequences=8)
    with pytest.raises(ValueError, match="shapes"):
        policy_loss(f["logps"], f["old"][:, :4], None, torch.zeros(8), f["mask"], loss_type="grpo",
                    epsilon=EPS, beta=0.0, max_completion_len=MAX_LEN, num_sequences=8)
