"""GRPO, Dr. GRPO and RLOO: group advantages and the clipped policy-gradient loss, pure functions.

Shapes: a step samples G = ``num_generations`` completions for each of P prompts, N = P·G rows in
group order (the completions of prompt p are rows p·G … p·G+G−1). Per-token tensors are (N, T),
right-padded to T completion tokens; ``mask`` (N, T) bool is True on a real completion token (the
EOS included when it was sampled), T_i = Σ_t mask_it. ``logps`` are the policy's log-probs of the
sampled tokens now (differentiable), ``old_logps`` the same at sampling time (π_old, constants),
``ref_logps`` the reference policy's (constants).

Advantages, per group of rewards r_1 … r_G with mean r̄ and Bessel-corrected std s:

    grpo      A_i = (r_i − r̄) / (s + eps)                  DeepSeekMath (Shao et al. 2024); TRL's
                                                            ``scale_rewards="group"``, eps = 1e-4
    dr_grpo   A_i = r_i − r̄                                Dr. GRPO (Liu et al. 2025): no std scaling
    rloo      A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j = G/(G−1)·(r_i − r̄)
                                                            leave-one-out baseline (Ahmadian et al. 2024)

A group whose rewards are all equal carries no signal: its advantages are exactly 0.

Per token, with ρ = exp(logp − old_logp) the importance ratio and ε the clipping range:

    L_t = −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A)  +  β·k3_t      (the β term for grpo and dr_grpo only)
    k3_t = exp(ref − logp) − (ref − logp) − 1 ≥ 0         Schulman's k3 estimator of KL(π ‖ π_ref)

RLOO puts the KL in the reward instead, before the advantages (TRL's RLOO, Ahmadian et al.):
r'_i = r_i − β·KL_i with KL_i = Σ_t (logp − ref)_it over the completion (`sequence_kl_penalty`).

Aggregation (`policy_loss`), with S = ``num_sequences`` the completions of the WHOLE step (all
micro-batches, all ranks) and L_max = ``max_completion_len``:

    grpo, rloo   loss = Σ_i (Σ_t mask_it·L_it / max(T_i, 1)) / S      token mean, then sequence mean
    dr_grpo      loss = Σ_i Σ_t mask_it·L_it / (S · L_max)            a constant normaliser

Each call returns its micro-batch's share, so the shares summed over micro-batches and ranks are
the loss of the step. At ρ = 1 (the first iteration on fresh samples) the gradient is the policy
gradient ∂loss/∂logp_it = −A_i·w_it (+ the KL term), w_it = 1/(S·T_i) or 1/(S·L_max).

Metrics, TRL's names, token means over all completion tokens of the step: ``kl`` (mean k3),
``clip_ratio/low_mean`` (ρ < 1−ε and A < 0: the ratio clipped from below),
``clip_ratio/high_mean`` (ρ > 1+ε and A > 0), ``clip_ratio/region_mean`` (either). They come as
sums and a token count (`PolicySums`) that add over micro-batches and ranks exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "rloo")
KL_IN_REWARD = frozenset({"rloo"})  # the loss types whose KL is folded into the reward, not the loss


def check_policy_options(loss_type: str, epsilon: float, beta: float) -> None:
    """Raise ValueError for a loss type, ε or β no loss can use (naming the option)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo loss {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if not epsilon > 0:
        raise ValueError(f"grpo epsilon must be positive, got {epsilon}")
    if not beta >= 0:
        raise ValueError(f"grpo beta must be at least 0, got {beta}")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp32, or fp64 when given fp64 (the tests' references)."""
    return x if x.dtype == torch.float64 else x.float()


def group_advantages(rewards: torch.Tensor, num_generations: int, loss_type: str,
                     eps: float = 1e-4) -> torch.Tensor:
    """Advantages (P·G,) from rewards (P·G,) in group order (formulas in the module docstring).

    A group whose rewards are all equal gets exactly 0 (no NaN, no inf, no rounding residue).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo loss {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    g = num_generations
    if g < 2:
        raise ValueError(f"group advantages need at least 2 completions per prompt, got num_generations={g}")
    if rewards.dim() != 1 or rewards.numel() % g:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)}: expected (P·G,) with G={g}")
    r = _wide(rewards.detach()).view(-1, g)                        # (P, G)
    centered = r - r.mean(dim=1, keepdim=True)
    if loss_type == "grpo":
        adv = centered / (r.std(dim=1, keepdim=True) + eps)        # torch.std is Bessel-corrected
    elif loss_type == "dr_grpo":
        adv = centered
    else:
        adv = centered * (g / (g - 1))
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)                # (P, 1): all rewards equal
    return torch.where(flat, torch.zeros_like(adv), adv).view(-1)


def sequence_kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL_i = Σ_t mask_it·(logp − ref_logp)_it, (N,), detached: RLOO's per-sequence k1 estimate,
    subtracted from the reward (r − β·KL) before the advantages; a constant of the loss."""
    diff = _wide(logps.detach()) - _wide(ref_logps.detach())
    return torch.where(mask, diff, 0.0).sum(dim=1)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3_t = exp(ref − logp) − (ref − logp) − 1, (N, T), ≥ 0; differentiable in ``logps``:
    ∂k3/∂logp = 1 − exp(ref − logp)."""
    d = ref_logps.detach() - logps
    return torch.exp(d) - d - 1


@dataclass
class PolicySums:
    """One micro-batch's metric sums over its real completion tokens, 0-d tensors, detached.

    ``a + b`` adds two micro-batches; ``stacked()`` / ``from_stacked`` carry them through one
    all-reduce; ``means()`` gives TRL's metrics (each sum / tokens). ``kl`` is None without
    reference log-probs.
    """

    tokens: torch.Tensor         # Σ mask
    clip_low: torch.Tensor       # Σ mask·[ρ < 1−ε ∧ A < 0]
    clip_high: torch.Tensor      # Σ mask·[ρ > 1+ε ∧ A > 0]
    clip_region: torch.Tensor    # Σ mask·(low ∨ high)
    kl: torch.Tensor | None = None  # Σ mask·k3

    def __add__(self, other: PolicySums) -> PolicySums:
        if (self.kl is None) != (other.kl is None):
            raise ValueError("cannot add policy sums with and without kl")
        return PolicySums(self.tokens + other.tokens, self.clip_low + other.clip_low,
                          self.clip_high + other.clip_high, self.clip_region + other.clip_region,
                          None if self.kl is None else self.kl + other.kl)

    def stacked(self) -> torch.Tensor:
        """(4,) or (5,) with kl: [tokens, clip_low, clip_high, clip_region(, kl)]."""
        parts = [self.tokens, self.clip_low, self.clip_high, self.clip_region]
        return torch.stack(parts + ([] if self.kl is None else [self.kl]))

    @classmethod
    def from_stacked(cls, t: torch.Tensor) -> PolicySums:
        return cls(t[0], t[1], t[2], t[3], t[4] if t.numel() > 4 else None)

    def means(self) -> dict[str, torch.Tensor]:
        """TRL's names: ``kl`` (when known), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean``; 0-d tensors, 0 when there are no tokens."""
        n = self.tokens.clamp(min=1)
        out = {"kl": self.kl / n} if self.kl is not None else {}
        return out | {"clip_ratio/low_mean": self.clip_low / n, "clip_ratio/high_mean": self.clip_high / n,
                      "clip_ratio/region_mean": self.clip_region / n}


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str, epsilon: float, beta: float,
                max_completion_len: int, num_sequences: int) -> tuple[torch.Tensor, PolicySums]:
    """This micro-batch's share of the step loss (0-d, fp32 or fp64) and its metric sums.

    ``logps``, ``old_logps``, ``ref_logps`` (N, T); ``advantages`` (N,); ``mask`` (N, T) bool;
    ``num_sequences`` = S, the completions of the whole step. Differentiable in ``logps`` only.
    ``ref_logps`` may be None when β = 0 or for rloo; given, the ``kl`` metric is computed anyway.
    Padding positions may hold anything (they are masked before any arithmetic).
    """
    check_policy_options(loss_type, epsilon, beta)
    if num_sequences < 1 or max_completion_len < 1:
        raise ValueError(f"num_sequences={num_sequences}, max_completion_len={max_completion_len}: expected ≥ 1")
    kl_in_loss = beta > 0 and loss_type not in KL_IN_REWARD
    if kl_in_loss and ref_logps is None:
        raise ValueError(f"grpo loss {loss_type!r} with beta={beta} needs the reference log-probs")
    per_token_inputs = [logps, old_logps] + ([] if ref_logps is None else [ref_logps])
    if any(x.shape != mask.shape for x in per_token_inputs) or advantages.shape != mask.shape[:1]:
        raise ValueError(f"shapes: log-probs {[tuple(x.shape) for x in per_token_inputs]}, mask "
                         f"{tuple(mask.shape)}, advantages {tuple(advantages.shape)}: expected (N, T) and (N,)")
    logps = _wide(logps)
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    log_ratio = torch.where(mask, logps - _wide(old_logps.detach()), zero)   # 0 on padding: ρ = 1
    ratio = torch.exp(log_ratio)                                              # (N, T)
    adv = _wide(advantages.detach()).to(logps.dtype)[:, None]                 # (N, 1)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.minimum(ratio * adv, clipped * adv)                    # (N, T)
    k3 = None
    if ref_logps is not None:
        # k3 = 0 on padding: both log-probs set to 0 there
        k3 = kl_k3(torch.where(mask, logps, zero), torch.where(mask, _wide(ref_logps.detach()), zero))
        if kl_in_loss:
            per_token = per_token + beta * k3
    per_token = torch.where(mask, per_token, zero)
    if loss_type == "dr_grpo":
        loss = per_token.sum() / (num_sequences * max_completion_len)
    else:
        lengths = mask.sum(dim=1).clamp(min=1).to(logps.dtype)              # (N,)
        loss = (per_token.sum(dim=1) / lengths).sum() / num_sequences
    with torch.no_grad():
        low = mask & (ratio < 1 - epsilon) & (adv < 0)
        high = mask & (ratio > 1 + epsilon) & (adv > 0)
        sums = PolicySums(*(b.sum().to(logps.dtype) for b in (mask, low, high, low | high)),
                          kl=None if k3 is None else k3.detach().sum())
    return loss, sums
