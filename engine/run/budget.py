"""The forgetting budget (``--max-forgetting D``): which adapter a run may hand over.

After every measurement of the retention set (`engine.run.retention`: step 0, each evaluation,
the end) the budget judges ``retain/loss_delta``, the rise of the retention loss over the base's:

* inside the budget (delta ≤ D): the adapter of this step becomes the candidate for ``adapter/``,
  under ``--on-budget stop`` always (the last one inside), under ``keep-best`` when its eval
  ``loss`` is the lowest so far (without an eval loss, e.g. GRPO's reward-only eval, the last one);
* over it: ``stop`` ends the run here (`Run` leaves its loop; the final outputs are written with
  the candidate as ``adapter/``), ``keep-best`` goes on training.

At the end ``adapter/`` holds the candidate; ``keep-best`` also writes the final weights to
``adapter-last/``. The candidate's tensors (adapter-sized, on the CPU) and its figures are saved in
each checkpoint (``extras["budget"]``), so a resumed run picks the same adapter. A starting adapter
(``--init-adapter``) already over the budget at step 0 leaves no candidate: the run stops there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from engine.errors import EXIT_INPUT_ERROR, RunStopped
from engine.run.checkpoint import load_extra

EXTRA = "budget"  # the checkpoint's budget.safetensors
LAST = "adapter-last"  # keep-best: the final weights, beside the chosen adapter/
_ADAPTER_PREFIX = "adapter."


@dataclass
class Candidate:
    """An in-budget adapter: its step, retention rise, eval loss (None without one) and tensors."""

    step: int
    delta: float
    eval_loss: float | None
    tensors: dict[str, torch.Tensor]


class ForgettingBudget:
    """``--max-forgetting`` and ``--on-budget``: the candidate adapter and the decision to stop."""

    def __init__(self, limit: float, policy: str):
        self.limit, self.policy = limit, policy
        self.candidate: Candidate | None = None
        self.exceeded: dict[str, Any] | None = None  # the first measurement over the budget

    @classmethod
    def from_config(cls, cfg: Any) -> ForgettingBudget | None:
        return cls(cfg.max_forgetting, cfg.on_budget) if cfg.max_forgetting is not None else None

    def judge(self, step: int, result: dict[str, Any], gather_adapter: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Record this measurement; True when the run must stop now. ``gather_adapter`` returns
        the adapter's tensors (a collective under FSDP2: every rank calls judge in step)."""
        delta = result["retain/loss_delta"]
        if delta <= self.limit:
            loss = result.get("loss")
            better = (self.policy == "stop" or self.candidate is None or loss is None
                      or self.candidate.eval_loss is None or loss < self.candidate.eval_loss)
            if better:
                tensors = {k: v.detach().to("cpu", copy=True) for k, v in gather_adapter().items()}
                self.candidate = Candidate(step, delta, loss, tensors)
            return False
        if self.exceeded is None:
            self.exceeded = {"step": step, "retain/loss": result["retain/loss"], "retain/loss_delta": delta}
        if self.candidate is None:
            raise RunStopped(f"step {step}: the retention loss {result['retain/loss']:.4f} is already {delta:+.4f} "
                             f"nats over the base's {result['retain/base_loss']:.4f}, past --max-forgetting "
                             f"{self.limit:g}, before any training (the --init-adapter spent the budget); no adapter "
                             "was written. Raise the budget or start from another adapter", EXIT_INPUT_ERROR)
        return self.policy == "stop"

    def message(self) -> str | None:
        """What the budget did, for the summary and stderr (None while never exceeded)."""
        if self.exceeded is None:
            return None
        over, kept = self.exceeded, self.candidate
        what = "the run stopped there" if self.policy == "stop" else f"training went on ({LAST}/ holds the final weights)"
        return (f"step {over['step']}: retention loss {over['retain/loss']:.4f}, {over['retain/loss_delta']:+.4f} "
                f"nats over the base, past --max-forgetting {self.limit:g}: {what}; adapter/ is the adapter of step "
                f"{kept.step} ({kept.delta:+.4f} nats over the base)")

    def report(self) -> dict[str, Any]:
        """The budget's figures for the summary line and the completion marker."""
        kept = self.candidate
        return {"max_forgetting": self.limit, "on_budget": self.policy, "exceeded": self.exceeded,
                "adapter_step": kept.step if kept else None, "adapter_loss_delta": kept.delta if kept else None}

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, torch.Tensor]:
        if self.candidate is None:
            return {}
        kept = self.candidate
        figures = torch.tensor([kept.step, kept.delta, kept.eval_loss if kept.eval_loss is not None else float("nan")],
                               dtype=torch.float64)
        return {"candidate": figures, **{_ADAPTER_PREFIX + k: v for k, v in kept.tensors.items()}}

    def restore(self, checkpoint: Path) -> None:
        saved = load_extra(checkpoint, EXTRA)
        if "candidate" not in saved:
            return
        step, delta, loss = saved.pop("candidate").tolist()
        tensors = {k[len(_ADAPTER_PREFIX):]: v for k, v in saved.items()}
        self.candidate = Candidate(int(step), delta, None if loss != loss else loss, tensors)
