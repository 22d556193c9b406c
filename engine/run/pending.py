"""Steps whose figures are still on the device: read on the host once per log interval.

A training step leaves its loss, gradient norm, ``found_inf`` and method metrics as 0-d tensors
on the device; reading any of them on the host would make the CPU wait for the GPU at every
step. `PendingSteps` keeps them, with the host-side facts of the step (number, rate, token
counts, samples, time), until the run needs them — a logging step, an evaluation, a checkpoint,
the end — and then `read` moves all of them to the host in one copy (`read_on_host`) and returns
one `StepRecord` of plain floats per step, in order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.run.optimizer import Update


@dataclass
class StepResult:
    """What a recipe's step returns: its mean loss, the optimizer's `Update`, the tokens the loss
    was normalised by, the non-padding tokens processed (throughput), the samples of the window
    ("file:line", named when a step is skipped) and the method's own metrics. The loss and the
    metrics may be 0-d tensors left on the device: `Run` reads them once per log interval."""

    loss: torch.Tensor | float
    update: Update
    tokens: int
    real_tokens: int
    samples: list[str]
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class StepRecord:
    """One finished step, read on the host."""

    step: int
    loss: float
    grad_norm: float
    applied: bool
    lr: float
    tokens: int
    real_tokens: int
    samples: list[str]
    metrics: dict[str, float]
    seconds: float  # wall time since the previous step ended (the device work is asynchronous:
    # only the sum over a read interval is meaningful on a GPU)


def read_on_host(values: list[torch.Tensor | float]) -> list[float]:
    """Floats of 0-d tensors (any devices) and plain numbers: one stack and one copy to the
    host per device, the only place the training loop reads device tensors."""
    out: list[float] = [v if not isinstance(v, torch.Tensor) else 0.0 for v in values]
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
    for device, where in by_device.items():
        stacked = torch.stack([values[i].detach().reshape(()).to(torch.float64) for i in where])
        for i, x in zip(where, stacked.to("cpu", copy=True).tolist()):
            out[i] = x
    return out


class PendingSteps:
    """The steps not read yet (see the module docstring)."""

    def __init__(self) -> None:
        self._steps: list[tuple[int, object, float]] = []
        self._last_end = time.perf_counter()

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, step: int, result) -> None:
        """Keep ``result`` (an `engine.run.session.StepResult`) of step ``step`` (1-based)."""
        now = time.perf_counter()
        self._steps.append((step, result, now - self._last_end))
        self._last_end = now

    def restart_clock(self) -> None:
        """Exclude what happens now (an evaluation, a checkpoint) from the next step's time."""
        self._last_end = time.perf_counter()

    def read(self) -> list[StepRecord]:
        """Every pending step as a `StepRecord`, in order; the pending list is emptied."""
        steps, self._steps = self._steps, []
        values: list[torch.Tensor | float] = []
        for _, result, _ in steps:
            update = result.update
            values += [result.loss, update.grad_norm, update.found_inf, *result.metrics.values()]
        floats = iter(read_on_host(values))
        records = []
        for step, result, seconds in steps:
            loss, grad_norm, found_inf = next(floats), next(floats), next(floats)
            metrics = {name: next(floats) for name in result.metrics}
            records.append(StepRecord(step, loss, grad_norm, found_inf == 0.0, result.update.lr, result.tokens,
                                      result.real_tokens, result.samples, metrics, seconds))
        return records
