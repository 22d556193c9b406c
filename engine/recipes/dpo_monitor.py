"""Likelihood displacement: DPO satisfying its objective by making both answers less likely.

The DPO loss only sees the log-ratio difference ``h``; it can grow while the likelihood of the
chosen answers falls too (the rejected ones just fall faster). Past a point the model unlearns the
very answers it should prefer — on the README's walk-through at lr 5e-4 the held-out reward
accuracy read 0.88 while the chosen answers lost 1.5 nats per token and the domain perplexity
quadrupled. `DisplacementMonitor` watches the chosen answers' log-likelihood per token
(``logps/chosen_per_token``) against its first value and warns once when it has fallen by more
than ``threshold`` nats per token while the reward margin is positive (the run "looks good").

With an eval set it watches the held-out pairs at every evaluation (the first one is at step 0,
where the policy is the reference); without one, the mean of the last few training steps against
the first step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TRAIN_WINDOW = 5  # training steps averaged when there is no eval set


@dataclass
class DisplacementMonitor:
    threshold: float  # nats per token; 0 turns the warning off
    start: float | None = None
    warned: bool = False
    recent: deque = field(default_factory=lambda: deque(maxlen=TRAIN_WINDOW))

    def resume(self, records: list[dict], with_eval: bool) -> None:
        """Take up a resumed run's watch from its metrics: the first value and any warning given."""
        kind, key = ("eval", "eval/logps/chosen_per_token") if with_eval else ("train", "logps/chosen_per_token")
        first = next((r[key] for r in records if r["kind"] == kind and key in r), None)
        self.start = first
        self.warned = any(r["kind"] == "warning" and "likelihood displacement" in r.get("message", "")
                          for r in records)

    def observe(self, chosen_per_token: float, margin: float, kl: float | None = None,
                smooth: bool = False) -> str | None:
        """The warning to give now, if any (at most once per run)."""
        if smooth:
            self.recent.append(chosen_per_token)
            chosen_per_token = sum(self.recent) / len(self.recent)
        if self.start is None:
            self.start = chosen_per_token
            return None
        drop = self.start - chosen_per_token
        if self.warned or self.threshold <= 0 or drop <= self.threshold or margin <= 0:
            return None
        self.warned = True
        kl_text = f", KL to the reference {kl:.3f} nats/token" if kl is not None else ""
        return (f"likelihood displacement: the chosen answers lost {drop:.2f} nats/token of log-likelihood "
                f"({self.start:.2f} -> {chosen_per_token:.2f}) while the reward margin grew to {margin:.3f}"
                f"{kl_text}; the model is making both answers unlikely and may be breaking. Lower --lr, "
                "raise --dpo-beta or --rpo-alpha, or train for fewer steps")
