"""DPO losses and metrics from sequence log-probabilities: pure functions, no model.

Inputs are, per preference pair, the policy's and the reference's log-probabilities of the chosen
and the rejected completion, each (B,) fp32: ``π_c, π_r, ref_c, ref_r`` (summed over completion
tokens; IPO takes them averaged per token, see `IPO_MEANS_LOGPS`). With β > 0 and

    h      = (π_c − ref_c) − (π_r − ref_r)          the log-ratio difference
    logits = β h                                    (TRL's ``beta * logits``)

the per-pair losses are (ε = label smoothing, σ the logistic function):

    sigmoid   −(1 − ε) log σ(βh) − ε log σ(−βh)                 DPO (Rafailov et al. 2023);
                                                                ε > 0: conservative DPO (cDPO)
    robust    (−(1 − ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε)   robust DPO (Chowdhury et al. 2024),
                                                                TRL's ``loss_type="robust"``, 0 ≤ ε < ½
    ipo       (h − 1/(2β))²                                     IPO (Azar et al. 2023, eq. 17), TRL's
    hinge     max(0, 1 − βh)                                    SLiC-style hinge, TRL's

Note the sign of the ε term of ``robust``: it is TRL's unbiased estimator
``((1 − ε) ℓ(βh) − ε ℓ(−βh)) / (1 − 2ε)`` with ℓ(x) = −log σ(x), i.e. ``+ε log σ(−βh)``; the
conservative ``−ε log σ(−βh)`` form is ``sigmoid`` with ε > 0.

Implicit rewards and metrics, under TRL's names (means over the pairs):

    rewards/chosen     β (π_c − ref_c)
    rewards/rejected   β (π_r − ref_r)
    rewards/margins    rewards/chosen − rewards/rejected  (= βh)
    rewards/accuracies 1 where rewards/chosen > rewards/rejected (strictly), else 0
    logps/chosen       π_c
    logps/rejected     π_r
    logps/chosen_per_token, logps/rejected_per_token
                       π_c / |y_c|, π_r / |y_r|: nats per completion token, comparable across
                       answers of any length (a falling chosen value is likelihood displacement)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")
# TRL divides each sequence's summed log-prob by its completion length for IPO only.
IPO_MEANS_LOGPS = frozenset({"ipo"})
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logps/chosen_per_token", "logps/rejected_per_token")


def check_loss_options(loss_type: str, beta: float, label_smoothing: float) -> None:
    """Raise ValueError for a loss type, β or ε no loss can use (naming the option)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo loss {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"dpo beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"dpo label smoothing applies to the sigmoid and robust losses, not {loss_type!r}")


def log_ratio_difference(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                         ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = (π_c − ref_c) − (π_r − ref_r), (B,); differentiable in the policy log-probs."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair losses (B,) in fp32 for `loss_type` (formulas in the module docstring).

    All four inputs are (B,); the reference ones should carry no gradient.
    """
    check_loss_options(loss_type, beta, label_smoothing)
    h = log_ratio_difference(policy_chosen.float(), policy_rejected.float(), ref_chosen.float(),
                             ref_rejected.float())
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return torch.relu(1 - beta * h)


def implicit_rewards(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """β (log π − log π_ref), (B,), detached: DPO's implicit reward of each completion."""
    return beta * (policy.detach().float() - ref.detach().float())


def dpo_metrics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, *, beta: float, chosen_tokens: torch.Tensor,
                rejected_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair values (B,) of every metric in `METRIC_NAMES`; the logged metric is their mean.

    Per-pair rather than means so that micro-batches of one accumulation window (or of an eval
    set) can be concatenated and averaged over all their pairs.
    """
    chosen = implicit_rewards(policy_chosen, ref_chosen, beta)
    rejected = implicit_rewards(policy_rejected, ref_rejected, beta)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "rewards/margins": chosen - rejected,
        "logps/chosen": policy_chosen.detach().float(),
        "logps/rejected": policy_rejected.detach().float(),
        "logps/chosen_per_token": policy_chosen.detach().float() / chosen_tokens.clamp(min=1),
        "logps/rejected_per_token": policy_rejected.detach().float() / rejected_tokens.clamp(min=1),
    }


def mean_metrics(parts: list[dict[str, torch.Tensor]], on_host: bool = True) -> dict[str, float | torch.Tensor]:
    """Concatenate per-pair metric tensors of several batches and average each over all pairs:
    floats, or with ``on_host=False`` 0-d tensors left on the device (a training step's metrics,
    read with the step's other figures once per log interval)."""
    if not parts:
        return {}
    means = {name: torch.cat([p[name] for p in parts]).float().mean() for name in parts[0]}
    return {name: m.item() for name, m in means.items()} if on_host else means
