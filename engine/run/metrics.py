"""Metrics of a run: one JSON object per line in ``OUTPUT/metrics.jsonl``, and a loss-curve PNG.

Lines carry a ``kind`` ("train", "eval", "skip", "warning", "resume", "summary") and the optimizer
``step``. On resume the file is cut back to the resumed step, so it always reads as one
uninterrupted run; a torn last line (a write cut short by a kill or a full disk) is dropped then.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            self.path.write_text("", encoding="utf-8")
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if (record := _parse(line)) is not None and record.get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, **{k: _jsonable(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


class DiscardedLog:
    """The metrics log of a rank other than 0 under torchrun: rank 0 writes the one file."""

    def write(self, kind: str, step: int, **values: Any) -> None:
        pass


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete line of a metrics file (a torn last line is left out)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [record for line in lines if (record := _parse(line)) is not None]


@dataclass(frozen=True)
class Curve:
    """A chart a run draws at its end (loss.png, a method's own): ``train_key`` of the train lines
    and ``eval_key`` of the eval lines against the step, in ``OUTPUT/png``; ``also`` adds more eval
    keys as (key, label), dashed (the retention loss beside the training loss)."""

    png: str
    train_key: str
    eval_key: str
    ylabel: str
    also: tuple[tuple[str, str], ...] = ()


def plot_curves(metrics_path: str | Path, folder: str | Path, curves: list[Curve]) -> None:
    """Each curve of a run's ``metrics.jsonl`` as ``folder/curve.png``."""
    for curve in curves:
        plot_curve(metrics_path, Path(folder) / curve.png, curve)


def plot_curve(metrics_path: str | Path, png_path: str | Path, curve: Curve) -> None:
    """``curve.train_key`` per train line and ``curve.eval_key`` at the eval steps, integer step ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(metrics_path)
    train = [(r["step"], r[curve.train_key]) for r in records
             if r["kind"] == "train" and isinstance(r.get(curve.train_key), (int, float))]
    evals = [(r["step"], r[curve.eval_key]) for r in records
             if r["kind"] == "eval" and isinstance(r.get(curve.eval_key), (int, float))]
    name = curve.train_key.split("/")[-1]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label=f"train {name}", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label=f"eval {name}", linewidth=1.5)
    for key, label in curve.also:
        points = [(r["step"], r[key]) for r in records
                  if r["kind"] == "eval" and isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), "s--", label=label, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(curve.ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
