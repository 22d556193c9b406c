"""What `Run` calls to watch forgetting: the retention set (`engine.run.retention`) and, with
``--max-forgetting``, the budget (`engine.run.budget`), as one object with four duties:

* ``measure`` after the recipe's own evaluation: the ``retain/*`` figures joined to the eval
  line, the budget's judgement (stop or go on), and the checkpoint extras brought up to date;
* ``restore`` on ``--resume``: the cached base numbers and the budget's candidate;
* ``adapters`` at the end: which weights go to ``adapter/`` (and ``adapter-last/``);
* ``report`` for the summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from engine.run import budget as budget_module
from engine.run import retention as retention_module
from engine.run.budget import ForgettingBudget
from engine.run.distributed import Parallel
from engine.run.retention import Retention


class ForgettingWatch:
    """The retention set and its optional budget, for one run."""

    def __init__(self, retention: Retention, budget: ForgettingBudget | None):
        self.retention, self.budget = retention, budget
        self.stop = False  # set when the budget ends the run

    @classmethod
    def open(cls, cfg: Any, tokenizer: Any, max_len: int, vocab_size: int) -> ForgettingWatch | None:
        """None without ``--retain-data``; its samples are read and checked here, before any write."""
        retention = Retention.load(cfg, tokenizer, max_len, vocab_size)
        return cls(retention, ForgettingBudget.from_config(cfg)) if retention is not None else None

    def measure(self, model: torch.nn.Module, device: torch.device, parallel: Parallel, step: int,
                result: dict[str, Any], extras: dict[str, dict[str, torch.Tensor]],
                gather_adapter: Callable[[], dict[str, torch.Tensor]]) -> str:
        """Add the ``retain/*`` figures to ``result`` (the eval line); judge the budget; update the
        checkpoint ``extras``. Returns the retention part of the printed line."""
        result.update(self.retention.measure(model, device, parallel))
        extras[retention_module.EXTRA] = self.retention.state()
        if self.budget is not None:
            self.stop = self.budget.judge(step, result, gather_adapter)
            extras[budget_module.EXTRA] = self.budget.state()
        return self.retention.summary(result)

    def restore(self, checkpoint: Path, extras: dict[str, dict[str, torch.Tensor]]) -> None:
        self.retention.restore(checkpoint)
        extras[retention_module.EXTRA] = self.retention.state()
        if self.budget is not None:
            self.budget.restore(checkpoint)
            extras[budget_module.EXTRA] = self.budget.state()

    def adapters(self, step: int) -> list[tuple[str, dict[str, torch.Tensor] | None, int]]:
        """(folder, tensors or None for the weights as they are, step) of each adapter to write."""
        kept = self.budget.candidate if self.budget is not None else None
        if kept is None:
            return [("adapter", None, step)]
        chosen = [("adapter", None if kept.step == step else kept.tensors, kept.step)]
        return chosen + ([(budget_module.LAST, None, step)] if self.budget.policy == "keep-best" else [])

    def adapter_note(self, step: int) -> str:
        """How ``adapter/`` relates to the final weights, for the last line of the run ("" when it is them)."""
        kept = self.budget.candidate if self.budget is not None else None
        if kept is None or kept.step == step:
            return ""
        return f" (the adapter of step {kept.step}, inside --max-forgetting; the evaluation above is of step {step})"

    def message(self) -> str | None:
        return self.budget.message() if self.budget is not None else None

    def report(self) -> dict[str, Any]:
        return {"retain_data": self.retention.report.file, **(self.budget.report() if self.budget else {})}
