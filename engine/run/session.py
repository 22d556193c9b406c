"""`Run`: what every training method shares around its own loss, called by the recipe in order.

    with Run.open(cfg, method="sft", progress=True) as run:   # flags, output folder, device, tokenizer
        data = ...                                              # the recipe's own data
        run.plan(steps_per_epoch)                               # total steps, warmup
        trainable = run.build_model()                           # base (+NF4) + LoRA, the rest frozen
        run.start(trainable, reports, evaluate, summarize)      # optimizer; resume, or a fresh folder
        for window in run.windows(loader):                      # grad_accum micro-batches per step
            run.end_step(train_step(run, window))               # log, guard, eval, checkpoint, SIGTERM
        return run.finish()                                     # final eval, adapter, completion marker

The recipe's step computes its loss per micro-batch, calls ``backward`` and then
``run.optimizer.step(loss, run.step)`` (guard, clip, schedule, AdamW), and returns a `StepResult`.
Everything else is here: the data position (epoch, batch index) that makes resume exact, the
count of non-finite steps in a row (stop with `EXIT_DIVERGED` after ``max_bad_steps``), metrics
lines, evaluation and checkpoints on their schedules, and SIGTERM (checkpoint at the next step
boundary, exit with `EXIT_PREEMPTED`).
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.adapters import load_adapter_weights, save_adapter
from engine.config import TrainConfig
from engine.data.batching import Batch
from engine.errors import EXIT_DIVERGED, EXIT_PREEMPTED, InputError, RunStopped
from engine.run.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from engine.run.folder import COMPLETE, lineage, prepare_output_dir, write_json
from engine.run.metrics import MetricsLog, plot_loss_curve
from engine.run.model import TrainableModel, build_model
from engine.run.optimizer import Optimizer, Update
from engine.run.schedule import default_warmup
from engine.run.setup import resolve_device, resolve_dtype, resolve_max_len
from models import load_tokenizer
from models.loading import read_config, resolve_model_dir


@dataclass
class StepResult:
    """What a recipe's step returns: its mean loss, the optimizer's `Update`, the tokens the loss
    was normalised by, the non-padding tokens processed (throughput), the samples of the window
    ("file:line", named when a step is skipped) and the method's own metrics."""

    loss: float
    update: Update
    tokens: int
    real_tokens: int
    samples: list[str]
    metrics: dict[str, float] = field(default_factory=dict)


class Run:
    """One training run's folder, model, optimizer, data position, log and schedules."""

    def __init__(self, cfg: TrainConfig, method: str, progress: bool):
        self.cfg, self.method, self.progress = cfg, method, progress
        self.output = Path(cfg.output)
        self.step = self.epoch = self.batch_index = self.bad_in_a_row = 0
        self.data: Any = None                                 # the recipe's data (train / eval, reports)
        self.final_eval: dict[str, Any] = {}
        self.extras: dict[str, dict[str, torch.Tensor]] = {}  # method tensors saved in checkpoints
        self.lineage_extra: dict[str, Any] = {}               # method fields of the adapter's lineage
        self._stop_requested = False

    # ------------------------------------------------------------------ before the first write

    @classmethod
    def open(cls, cfg: TrainConfig, method: str, progress: bool = True) -> Run:
        """Check the flags and the output folder; settle device, dtype, model folder and tokenizer."""
        cfg.validate()
        run = cls(cfg, method, progress)
        prepare_output_dir(run.output, resume=cfg.resume, overwrite=cfg.overwrite)
        run.device = resolve_device(cfg.device)
        run.dtype = resolve_dtype(cfg.dtype, run.device)
        run.model_dir = resolve_model_dir(cfg.model)
        run.max_len = resolve_max_len(cfg.max_len, read_config(run.model_dir))
        run.tokenizer = load_tokenizer(run.model_dir)
        return run

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc_info) -> None:
        return None

    def plan(self, steps_per_epoch: int) -> None:
        """``total_steps`` (``--max-steps``, or ``--epochs`` passes of ``grad_accum`` micro-batches)
        and the warmup."""
        cfg = self.cfg
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch / cfg.grad_accum))
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(self.total_steps)

    def build_model(self) -> TrainableModel:
        self.trainable = build_model(self.cfg, self.model_dir, self.device, self.dtype)
        self.model = self.trainable.model
        return self.trainable

    # ------------------------------------------------------------------ start

    def start(self, reports: list, evaluate: Callable[[], dict[str, Any]] | None,
              summarize: Callable[[dict[str, Any]], str]) -> Path | None:
        """Build the optimizer, then resume from the newest checkpoint (``--resume``) or begin a
        fresh folder (config.json, data_report.json). Returns the checkpoint resumed from, if any,
        so that the recipe can read its own extras there (`engine.run.checkpoint.load_extra`).

        ``evaluate()`` returns the eval metrics (None without an eval set: no evaluation);
        ``summarize`` turns them into the one line printed at each evaluation.
        """
        cfg = self.cfg
        self.evaluate_fn, self.summarize = evaluate, summarize
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = Optimizer(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                   weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                                   schedule=cfg.lr_schedule, warmup=self.warmup, total_steps=self.total_steps)
        resume_from = latest_checkpoint(self.output) if cfg.resume else None
        if cfg.resume and resume_from is None:
            raise InputError(f"--resume: no complete checkpoint in {self.output / 'checkpoints'}")
        self.output.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            state = load_checkpoint(resume_from, self.model, self.optimizer.adamw,
                                    lambda folder: load_adapter_weights(self.model, folder))
            self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
            self.bad_in_a_row = state["bad_in_a_row"]
        else:
            write_json(self.output / "config.json", cfg.to_json())
            write_json(self.output / "data_report.json", [r.__dict__ for r in reports if r is not None])
        self.metrics = MetricsLog(self.output / "metrics.jsonl", resume_step=self.step if resume_from else None)
        if self.progress:
            self._announce(reports, resume_from)
        return resume_from

    def _announce(self, reports: list, resume_from: Path | None) -> None:
        """What is about to happen, on stderr: the model, the adapter, the data, the steps."""
        data = self.data
        where = f"resuming at step {self.step} from {resume_from}" if resume_from else f"{self.total_steps} steps"
        print(f"model {self.cfg.model}: {self.trainable.trainable_parameters:,} trainable LoRA parameters; "
              f"{len(data.train)} training samples, {len(data.eval)} eval samples; {where}", file=sys.stderr)
        for report in reports:
            if report is not None:
                print(f"data: {report.summary()}", file=sys.stderr)

    # ------------------------------------------------------------------ the loop

    def windows(self, loader) -> Iterator[list[Batch]]:
        """The next ``grad_accum`` micro-batches, step after step, from the saved data position on,
        across epochs, until ``total_steps``; evaluates at step 0 first (with an eval set). The
        progress bar and the SIGTERM handler live as long as this generator."""
        if self.step == 0 and self.evaluate_fn is not None:
            self.evaluate()
        previous_handler = signal.signal(signal.SIGTERM, self._request_stop)
        self._bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc="train",
                         unit="step", dynamic_ncols=True)
        self.model.train()
        batches = self._batches_from_position(loader)
        try:
            while self.step < self.total_steps:
                self._window = [next(batches) for _ in range(self.cfg.grad_accum)]
                self._started = time.perf_counter()
                yield self._window
        finally:
            self._bar.close()
            signal.signal(signal.SIGTERM, previous_handler)

    def _batches_from_position(self, loader) -> Iterator[Batch]:
        epoch, start = self.epoch, self.batch_index
        while True:
            yield from loader.batches(epoch, start)
            epoch, start = epoch + 1, 0

    def end_step(self, result: StepResult) -> None:
        """After the recipe's optimizer step: advance the position, log, guard, evaluate and save
        on schedule, honour SIGTERM."""
        cfg = self.cfg
        self.step += 1
        last = self._window[-1]
        self.epoch, self.batch_index = last.epoch, last.index + 1
        elapsed = time.perf_counter() - self._started
        update = result.update
        if not update.applied:
            self.bad_in_a_row += 1
            self.metrics.write("skip", self.step, loss=result.loss, grad_norm=update.grad_norm,
                               samples=result.samples)
            if self.bad_in_a_row >= cfg.max_bad_steps:
                raise RunStopped(f"{self.bad_in_a_row} steps in a row with a non-finite loss or gradient, "
                                 f"the last at step {self.step} on samples {', '.join(result.samples[:8])}",
                                 EXIT_DIVERGED)
        else:
            self.bad_in_a_row = 0
        tok_s = result.real_tokens / max(elapsed, 1e-9)
        if update.applied and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
            self.metrics.write("train", self.step, loss=result.loss, lr=update.lr, grad_norm=update.grad_norm,
                               tokens=result.tokens, tokens_per_s=tok_s, epoch=self.epoch, **result.metrics)
        self._bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{update.lr:.2e}", tok_s=f"{tok_s:.0f}")
        self._bar.update(1)
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
            self.evaluate()
        if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
            self.save_checkpoint()
        if self._stop_requested and self.step < self.total_steps:
            path = self.save_checkpoint()
            raise RunStopped(f"SIGTERM at step {self.step}: checkpoint saved in {path}; continue with --resume",
                             EXIT_PREEMPTED)

    def _request_stop(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self._stop_requested = True

    # ------------------------------------------------------------------ eval, checkpoints, outputs

    def evaluate(self) -> dict[str, Any]:
        """Run the recipe's evaluation, log it as an ``eval`` line and print its summary."""
        result = self.evaluate_fn()
        self.metrics.write("eval", self.step, **result)
        if self.progress:
            tqdm.write(f"step {self.step}: {self.summarize(result)}")
        return result

    def adapter_metadata(self) -> dict[str, Any]:
        cfg = self.cfg
        files = [cfg.data] + ([cfg.eval_data] if cfg.eval_data else [])
        record = lineage(method=self.method, base_model=cfg.model, data_files=files, steps=self.step,
                         parent_adapter=cfg.init_adapter, parent_lineage=self.trainable.parent_lineage)
        return {**record, **self.lineage_extra}

    def write_adapter(self, folder: Path) -> None:
        save_adapter(self.model, self.trainable.lora_cfg, folder, self.cfg.model, metadata=self.adapter_metadata())

    def save_checkpoint(self) -> Path:
        state = {"epoch": self.epoch, "batch_index": self.batch_index, "bad_in_a_row": self.bad_in_a_row,
                 "total_steps": self.total_steps}
        return save_checkpoint(self.output, self.step, self.model, self.optimizer.adamw, state, self.write_adapter,
                               keep=self.cfg.keep_checkpoints, extras=self.extras)

    def finish(self) -> dict[str, Any]:
        """Final eval, the adapter, the loss curve, the summary line and the completion marker (last)."""
        self.final_eval = self.evaluate() if self.evaluate_fn is not None else {}
        self.write_adapter(self.output / "adapter")
        plot_loss_curve(self.output / "metrics.jsonl", self.output / "loss.png")
        summary = {"steps": self.step, "trainable_parameters": self.trainable.trainable_parameters,
                   "eval": self.final_eval, "adapter": str(self.output / "adapter")}
        self.metrics.write("summary", self.step, **summary)
        write_json(self.output / COMPLETE, summary)
        return self.final_eval
