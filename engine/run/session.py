"""`Run`: what every training method shares around its own loss, called by the recipe in order.

    with Run.open(cfg, method="sft", progress=True) as run:   # flags, output folder (read only), tokenizer
        run.data = ...                                          # the recipe's own data, checked
        run.plan(steps_per_epoch)                               # total steps, warmup
        run.build_model()                                       # lock the folder; base (+NF4) + LoRA
        run.start(reports, evaluate, summarize)                 # optimizer; resume, or begin the folder
        for window in run.windows(loader):                      # grad_accum micro-batches per step
            run.end_step(train_step(run, window))               # log, guard, eval, checkpoint, SIGTERM
        run.finish()                                            # final checks and eval, adapter, marker

Nothing is written before `start`: every input (flags, output folder, data, model and adapter
folders, sizes that follow from flags) is checked first, and a setup that fails leaves no trace
(the folder `build_model` created to hold its lock is removed again). The recipe's step computes
its loss per micro-batch, calls ``backward`` and then ``run.optimizer.step(loss, run.step)``
(guard, clip, schedule, AdamW), and returns a `StepResult`. Everything else is here: the data
position (epoch, batch index) that makes resume exact, what the checkpoint was made for
(`engine.run.fingerprint`), the count of non-finite steps in a row (stop with `EXIT_DIVERGED`
after ``max_bad_steps``), metrics lines (a step's figures stay on the device until a logging step,
an evaluation, a checkpoint or the end reads them all at once: `engine.run.pending`), evaluation and checkpoints on their schedules, the retention set and its budget
(``--retain-data``, ``--max-forgetting``: `engine.run.forgetting`), SIGTERM
(checkpoint at the next step boundary, exit with `EXIT_PREEMPTED`), and the final rule: a run
with no successful optimizer step, or whose adapter is not finite, fails with `EXIT_DIVERGED`
and no completion marker.

Under torchrun (`engine.run.distributed`) every rank runs this code on its share of each step
(`windows`); only rank 0 writes the output folder, the others join the collectives that gather
FSDP2's shards for it and wait at a barrier; the ranks agree on a SIGTERM stop at each step.
"""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.adapters import adapter_state_dict, load_adapter_weights, save_adapter
from engine.config import TrainConfig
from engine.data.batching import Batch
from engine.errors import EXIT_DIVERGED, EXIT_PREEMPTED, RunStopped
from engine.run.checkpoint import checkpoint_path, load_checkpoint, optimizer_tensors, save_checkpoint
from engine.run.distributed import Parallel, layout_report
from engine.run.fingerprint import resume_point, run_identity
from engine.run.forgetting import ForgettingWatch
from engine.run.folder import COMPLETE, RunFolder, lineage, write_json
from engine.run.metrics import Curve, DiscardedLog, MetricsLog, plot_curves
from engine.run.model import (
    TrainableModel,
    build_model,
    check_model_fits,
    non_finite_parameter,
)
from engine.run.optimizer import Optimizer, param_groups
from engine.run.pending import PendingSteps, StepRecord, StepResult
from engine.run.schedule import default_warmup
from engine.run.setup import resolve_dtype, resolve_max_len
from models import load_tokenizer
from models.loading import read_config, resolve_model_dir


class Run:
    """One training run's folder, model, optimizer, data position, log and schedules."""

    def __init__(self, cfg: TrainConfig, method: str, progress: bool):
        self.cfg, self.method, self.progress = cfg, method, progress
        self.output = Path(cfg.output)
        self.step = self.epoch = self.batch_index = self.bad_in_a_row = self.applied_steps = 0
        self.data: Any = None                                 # the recipe's data (train / eval, reports)
        self.final_eval: dict[str, Any] = {}
        self.eval_summary = ""                                # the latest evaluation's printed line
        self.extras: dict[str, dict[str, torch.Tensor]] = {}  # method tensors saved in checkpoints
        self.lineage_extra: dict[str, Any] = {}               # method fields of the adapter's lineage
        self.loss_label = "loss"                              # y axis of loss.png
        self.curves: list[Curve] = []                         # the method's charts beside loss.png
        self.warnings: list[str] = []                         # repeated in the summary
        self.forgetting: ForgettingWatch | None = None          # --retain-data (and --max-forgetting)
        self._last_eval: tuple[int, dict[str, Any]] | None = None  # (step, figures) of the latest evaluation
        self._begun = self._stop_requested = False
        self._pending = PendingSteps()                        # steps not yet read on the host

    # ------------------------------------------------------------------ before the first write

    @classmethod
    def open(cls, cfg: TrainConfig, method: str, progress: bool = True) -> Run:
        """Check the flags and the output folder; settle device, dtype, model folder and tokenizer."""
        cfg.validate()
        parallel = Parallel.start(cfg.distributed, cfg.device, cfg.dist_timeout)
        run = cls(cfg, method, progress and parallel.is_main)
        run.parallel = parallel
        run.device = parallel.device
        run.dtype = resolve_dtype(cfg.dtype, run.device)
        run.model_dir = resolve_model_dir(cfg.model)
        run.model_config = read_config(run.model_dir)
        run.max_len = resolve_max_len(cfg.max_len, run.model_config)
        parallel.check_replica_fits(run.model_config, run.dtype, cfg.quant)  # DDP: the whole model on each GPU
        run.folder = RunFolder(run.output, resume=cfg.resume, overwrite=cfg.overwrite)
        run.protected = [run.model_dir, *(Path(p) for p in (cfg.data, cfg.eval_data, cfg.init_adapter,
                                                             cfg.retain_data, cfg.replay_data) if p)]
        run.folder.check(run.protected)
        parallel.barrier()  # every rank checked the folder before rank 0 claims it
        run.tokenizer = load_tokenizer(run.model_dir)
        run.forgetting = ForgettingWatch.open(cfg, run.tokenizer, run.max_len, run.model_config.vocab_size)
        return run

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._begun:
            self.folder.abandon()  # nothing was written: leave no folder behind
        else:
            self.folder.release()
        if exc_type is None:
            self.parallel.close()

    def plan(self, steps_per_epoch: int) -> None:
        """``total_steps`` (``--max-steps``, or ``--epochs`` passes of ``grad_accum`` micro-batches per
        rank) and the warmup."""
        cfg = self.cfg
        self.micro_batches_per_step = cfg.grad_accum * self.parallel.world
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch /
                                                             self.micro_batches_per_step))
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(self.total_steps)

    def build_model(self, with_score_head: bool = False) -> TrainableModel:
        """Check that the model can take the adapter and the data, lock the output folder, then load
        the weights (base, NF4 with --quant nf4, the adapter; with ``with_score_head`` a reward
        model's head, part of the adapter), and wrap (DDP) or shard (FSDP2) the whole."""
        check_model_fits(self.cfg, self.model_config, self.data.max_token_id(), with_score_head)
        self.identity = run_identity(self.cfg, self.model_dir, self.max_len, self.dtype,
                                     micro_batches_per_step=self.micro_batches_per_step)
        if self.cfg.resume:
            resume_point(self.output, self.identity)  # a checkpoint made for another run fails here, before any weight is read
        if self.parallel.is_main:
            self.folder.claim(self.protected)
        self.trainable = build_model(self.cfg, self.model_dir, self.device, self.dtype, with_score_head)
        self.model = self.parallel.prepare(self.trainable.model)
        return self.trainable

    # ------------------------------------------------------------------ start

    def start(self, reports: list, evaluate: Callable[[], dict[str, Any]] | None,
              summarize: Callable[[dict[str, Any]], str]) -> Path | None:
        """Build the optimizer, then resume from the newest checkpoint (``--resume``, refused when
        it was made for something else) or begin the folder (an old run replaced by --overwrite
        only now; run.json, config.json, data_report.json). Returns the checkpoint resumed from, if
        any, so that the recipe can read its own extras there (`engine.run.checkpoint.load_extra`).

        ``evaluate()`` returns the eval metrics (None without an eval set: no evaluation);
        ``summarize`` turns them into the one line printed at each evaluation.
        """
        cfg = self.cfg
        self.evaluate_fn, self.summarize = evaluate, summarize
        reports = [*reports, self.forgetting.retention.report if self.forgetting else None]
        params = param_groups(self.model, cfg.loraplus_ratio)  # LoRA+: B at ratio x the rate
        self.optimizer = Optimizer(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                   weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                                   schedule=cfg.lr_schedule, warmup=self.warmup, total_steps=self.total_steps)
        resume_from, notes = resume_point(self.output, self.identity) if cfg.resume else (None, [])  # again, under the lock
        self._begun = True
        if resume_from is not None:
            state = load_checkpoint(resume_from, self.model, self.optimizer.adamw,
                                    lambda folder: load_adapter_weights(self.model, folder))
            self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
            self.bad_in_a_row = state["bad_in_a_row"]
            self.applied_steps = state.get("applied_steps", self.step)
            if self.forgetting is not None:
                self.forgetting.restore(resume_from, self.extras)
        elif self.parallel.is_main:
            self.folder.begin(self.method)
            write_json(self.output / "config.json", cfg.to_json())
            write_json(self.output / "data_report.json", [r.__dict__ for r in reports if r is not None])
        self.metrics = MetricsLog(self.output / "metrics.jsonl", resume_step=self.step if resume_from else None) \
            if self.parallel.is_main else DiscardedLog()
        if notes:
            self.metrics.write("resume", self.step, changed=notes)
        if self.parallel.distributed:
            self._log_distribution()
        if self.progress:
            self._announce(reports, resume_from, notes)
        return resume_from

    def _log_distribution(self) -> None:  # a "distributed" metrics line, and its summary on stderr
        fields, line = layout_report(self.parallel, self.model, self.micro_batches_per_step, self.cfg.batch_size)
        self.metrics.write("distributed", self.step, **fields)
        if self.progress:
            print(line, file=sys.stderr)

    def _announce(self, reports: list, resume_from: Path | None, notes: list[str]) -> None:
        """What is about to happen, on stderr: the model, the adapter, the data, the steps."""
        data = self.data
        where = f"resuming at step {self.step} from {resume_from}" if resume_from else f"{self.total_steps} steps"
        print(f"model {self.cfg.model}: {self.trainable.trainable_parameters:,} trainable LoRA parameters; "
              f"{len(data.train)} training samples, {len(data.eval)} eval samples; {where}", file=sys.stderr)
        for note in notes:
            print(f"resume: changed since the checkpoint: {note}", file=sys.stderr)
        for report in reports:
            if report is not None:
                print(f"data: {report.summary()}", file=sys.stderr)

    # ------------------------------------------------------------------ the loop

    def windows(self, loader) -> Iterator[list[Batch]]:
        """This rank's ``grad_accum`` micro-batches of each step (of the ``grad_accum · world`` the
        step takes from the global order), step after step, from the saved data position on,
        across epochs, until ``total_steps`` (or the forgetting budget's stop); evaluates at step 0
        first (with an eval or a retention set). The
        progress bar and the SIGTERM handler live as long as this generator."""
        if self.step == 0 and self.evaluates:
            self.evaluate()
        previous_handler = signal.signal(signal.SIGTERM, self._request_stop)
        self._bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc="train",
                         unit="step", dynamic_ncols=True)
        self.model.train()
        positions = self._positions_from(loader)
        try:
            while self.step < self.total_steps and not (self.forgetting and self.forgetting.stop):
                step = [next(positions) for _ in range(self.micro_batches_per_step)]  # (epoch, index) each
                self.step_positions = step  # every rank's micro-batches of this step; the last: the position after it
                yield [loader.batch(epoch, index) for epoch, index in self.parallel.window(step)]
        finally:
            self._bar.close()
            signal.signal(signal.SIGTERM, previous_handler)

    def _positions_from(self, loader) -> Iterator[tuple[int, int]]:
        """(epoch, batch index) of every micro-batch from the saved data position on, across epochs."""
        epoch, start = self.epoch, self.batch_index
        while True:
            yield from ((epoch, index) for index in range(start, loader.num_batches(epoch)))
            epoch, start = epoch + 1, 0

    def end_step(self, result: StepResult) -> list[StepRecord]:
        """After the recipe's optimizer step: advance the position; on a logging step (or before an
        evaluation, a checkpoint, a stop, the end) read the pending steps and log and guard them;
        evaluate and save on schedule, honour SIGTERM. Returns the steps read now (often none),
        for a recipe that watches its figures."""
        cfg = self.cfg
        self.step += 1
        epoch, index = self.step_positions[-1]
        self.epoch, self.batch_index = epoch, index + 1
        self._pending.add(self.step, result)
        self._bar.update(1)
        evaluating = bool(cfg.eval_every) and self.step % cfg.eval_every == 0 and self.step < self.total_steps
        saving = bool(cfg.save_every) and self.step % cfg.save_every == 0 and self.step < self.total_steps
        stopping = self.step < self.total_steps and (
            self.parallel.any(self._stop_requested) if self.parallel.distributed else self._stop_requested)
        records = []
        if self.step % cfg.log_every == 0 or self.step == self.total_steps or evaluating or saving or stopping:
            records = self.read_pending()
        if evaluating:
            self.evaluate()
        if saving:
            self.save_checkpoint()
        if stopping:
            path = self.save_checkpoint()
            raise RunStopped(f"SIGTERM at step {self.step}: checkpoint saved in {path}; continue with --resume",
                             EXIT_PREEMPTED)
        if evaluating or saving:
            self._pending.restart_clock()
        return records

    def read_pending(self) -> list[StepRecord]:
        """Read the steps left on the device (one copy to the host), then for each in order: count
        skipped steps (stop with `EXIT_DIVERGED` after ``max_bad_steps`` in a row), write its skip
        line, or its train line on a logging step; the progress bar shows the latest figures."""
        cfg = self.cfg
        records = self._pending.read()
        seconds = sum(r.seconds for r in records)
        tok_s = sum(r.real_tokens for r in records) / max(seconds, 1e-9)  # over the interval read
        for record in records:
            if not record.applied:
                self.bad_in_a_row += 1
                self.metrics.write("skip", record.step, loss=record.loss, grad_norm=record.grad_norm,
                                   samples=record.samples)
                if self.bad_in_a_row >= cfg.max_bad_steps:
                    raise RunStopped(f"{self.bad_in_a_row} steps in a row with a non-finite loss or gradient, the "
                                     f"last at step {record.step} on samples {', '.join(record.samples[:8])}",
                                     EXIT_DIVERGED)
                continue
            self.bad_in_a_row = 0
            self.applied_steps += 1
            if record.step % cfg.log_every == 0 or record.step == self.total_steps:
                self.metrics.write("train", record.step, loss=record.loss, lr=record.lr, grad_norm=record.grad_norm,
                                   tokens=record.tokens, tokens_per_s=tok_s, epoch=self.epoch, **record.metrics)
        if records:
            self._bar.set_postfix(loss=f"{records[-1].loss:.4f}", lr=f"{records[-1].lr:.2e}", tok_s=f"{tok_s:.0f}")
        return records

    def _request_stop(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self._stop_requested = True

    def warn(self, message: str) -> None:
        """A warning for the log (a ``warning`` metrics line), stderr and the final summary."""
        self.warnings.append(message)
        self.metrics.write("warning", self.step, message=message)
        if self.progress:
            tqdm.write(f"warning at step {self.step}: {message}", file=sys.stderr)

    # ------------------------------------------------------------------ eval, checkpoints, outputs

    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates: an eval set, or a retention set (``--retain-data``)."""
        return self.evaluate_fn is not None or self.forgetting is not None

    def evaluate(self) -> dict[str, Any]:
        """Run the recipe's evaluation and the retention set's (with its budget), log them as one
        ``eval`` line and print their summary."""
        result = self.evaluate_fn() if self.evaluate_fn is not None else {}
        parts = [self.summarize(result)] if self.evaluate_fn is not None else []
        if self.forgetting is not None:
            parts.append(self.forgetting.measure(self.model, self.device, self.parallel, self.step, result,
                                                 self.extras, self._gather_adapter))
        self.metrics.write("eval", self.step, **result)
        self.eval_summary = "; ".join(parts)
        if self.progress:
            tqdm.write(f"step {self.step}: {self.eval_summary}", file=sys.stderr)
        self._last_eval = (self.step, result)
        return result

    def adapter_metadata(self, steps: int | None = None) -> dict[str, Any]:
        cfg = self.cfg
        data = [self.identity["data"]] + ([self.identity["eval_data"]] if cfg.eval_data else [])
        record = lineage(method=self.method, base_model=cfg.model, data=data, steps=self.step if steps is None else steps,
                         parent_adapter=cfg.init_adapter, parent_lineage=self.trainable.parent_lineage)
        return {**record, **self.lineage_extra}

    def _gather_adapter(self) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.model, self.trainable.lora_cfg)

    def _adapter_writer(self, tensors: dict[str, torch.Tensor] | None = None,
                        steps: int | None = None) -> Callable[[Path], None]:
        """The adapter gathered now (a collective under FSDP2: every rank, in the same order), or
        ``tensors`` kept from step ``steps``, and a function that writes it to a folder on rank 0
        (and does nothing on the others)."""
        tensors = self._gather_adapter() if tensors is None else tensors

        def write(folder: Path) -> None:
            if self.parallel.is_main:
                save_adapter(self.model, self.trainable.lora_cfg, folder, self.cfg.model,
                             metadata=self.adapter_metadata(steps), tensors=tensors)
        return write

    def save_checkpoint(self) -> Path:
        """Every rank gathers the adapter and AdamW state (FSDP2) and waits; rank 0 writes them."""
        self.read_pending()  # the guard's counts go into the checkpoint
        state = {"epoch": self.epoch, "batch_index": self.batch_index, "bad_in_a_row": self.bad_in_a_row,
                 "applied_steps": self.applied_steps, "total_steps": self.total_steps, "made_for": self.identity}
        write_adapter = self._adapter_writer()
        optimizer_state = optimizer_tensors(self.model, self.optimizer.adamw)
        if self.parallel.is_main:
            save_checkpoint(self.output, self.step, optimizer_state, state, write_adapter,
                            keep=self.cfg.keep_checkpoints, extras=self.extras)
        self.parallel.barrier()  # the checkpoint exists for every rank once this returns
        return checkpoint_path(self.output, self.step)

    def finish(self) -> dict[str, Any]:
        """Check the outcome, then the final eval, the adapter, the loss curve, the summary line
        and the completion marker (last). A run with no successful step or a non-finite adapter
        stops with `EXIT_DIVERGED` before writing any of them."""
        self.read_pending()
        if self.applied_steps == 0:
            raise RunStopped(f"no optimizer step succeeded in {self.step} steps (every loss or gradient was "
                             f"non-finite; see the skip lines of {self.output / 'metrics.jsonl'})", EXIT_DIVERGED)
        bad = non_finite_parameter(self.model)
        if bad is not None:
            raise RunStopped(f"the trained adapter has non-finite values ({bad}); no adapter was written. "
                             "Lower --lr or check the data", EXIT_DIVERGED)
        if self._last_eval is not None and self._last_eval[0] == self.step:  # the budget stopped at this eval
            self.final_eval = self._last_eval[1]
        else:
            self.final_eval = self.evaluate() if self.evaluates else {}
        for name, tensors, steps in (self.forgetting.adapters(self.step) if self.forgetting else [("adapter", None, None)]):
            self._adapter_writer(tensors, steps)(self.output / name)
        if not self.parallel.is_main:
            self.parallel.barrier()  # rank 0 writes the rest, then joins this barrier
            return self.final_eval
        retention = (("retain/loss", "retention loss"), ("retain/base_loss", "retention loss, base")) \
            if self.forgetting else ()
        plot_curves(self.output / "metrics.jsonl", self.output,
                    [Curve("loss.png", "loss", "loss", self.loss_label, retention), *self.curves])
        summary = {"steps": self.step, "trainable_parameters": self.trainable.trainable_parameters,
                   "eval": self.final_eval, "adapter": str(self.output / "adapter"), "warnings": self.warnings}
        if self.forgetting is not None:
            summary["forgetting"] = self.forgetting.report()
            if self.forgetting.message() and self.progress:
                print(f"--max-forgetting: {self.forgetting.message()}", file=sys.stderr)
        self.metrics.write("summary", self.step, **summary)
        write_json(self.output / COMPLETE, summary)
        self.parallel.barrier()
        return self.final_eval
