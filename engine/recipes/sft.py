"""Supervised fine-tuning with LoRA or QLoRA: `SFTTrainer` with ``setup / train / save_checkpoint``.

One optimizer step, read top to bottom in `SFTTrainer.train_step`:

1. take the next ``grad_accum`` micro-batches in the epoch order (a pure function of seed and epoch,
   so the data position (epoch, batch index) is all a resume needs);
2. N = trainable tokens of the whole window (shifted labels that are not -100);
3. per micro-batch (`engine.loss`): h = model.hidden_states(...), loss_sum = Σ CE(h[:, :-1] W_headᵀ, labels[:, 1:])
   through the fused linear + cross-entropy, and ``(loss_sum / N).backward()``; the accumulated
   gradient is then exactly that of one big batch of the window, however it was split;
4. a non-finite loss or gradient never reaches the weights: the gradients are dropped, the step is
   logged as skipped with its sample ids, and after ``max_bad_steps`` in a row the run stops;
5. clip the global gradient norm, set the learning rate from the schedule, AdamW step;
6. log; evaluate every ``eval_every`` steps; checkpoint every ``save_every`` steps; on SIGTERM,
   checkpoint at this step boundary and exit with `EXIT_PREEMPTED`.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.adapters import (
    load_adapter,
    load_adapter_weights,
    read_adapter_metadata,
    save_adapter,
)
from engine.batching import Batch, BatchLoader
from engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from engine.config import TrainConfig
from engine.data import load_sft_data
from engine.errors import EXIT_DIVERGED, EXIT_PREEMPTED, InputError, RunStopped
from engine.lora import LoRAConfig, inject_lora, lora_modules, set_trainable
from engine.loss import accumulate_gradients, mean_loss
from engine.metrics import MetricsLog, plot_loss_curve
from engine.run_output import COMPLETE, lineage, prepare_output_dir, write_json
from engine.schedule import default_warmup, lr_at
from engine.setup import resolve_device, resolve_dtype, resolve_max_len
from models import load_model, load_tokenizer
from models.loading import read_config, resolve_model_dir


class SFTTrainer:
    """A LoRA / QLoRA supervised fine-tuning run, configured by a `TrainConfig`."""

    method = "sft"  # recorded in the adapter's lineage

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        cfg.validate()
        self.cfg = cfg
        self.output = Path(cfg.output)
        self.progress = progress
        self.step = 0
        self.epoch = 0
        self.batch_index = 0
        self.bad_in_a_row = 0
        self._stop_requested = False

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Everything before the first step: checks, data, model, LoRA, optimizer, resume.

        Bad input (flags, data, model folder) fails here, before anything is written.
        """
        cfg = self.cfg
        prepare_output_dir(self.output, resume=cfg.resume, overwrite=cfg.overwrite)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        model_dir = resolve_model_dir(cfg.model)
        model_cfg = read_config(model_dir)
        self.max_len = resolve_max_len(cfg.max_len, model_cfg)
        self.tokenizer = load_tokenizer(model_dir)
        self._load_data()
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.train_loader.num_batches(0)
                                                             / cfg.grad_accum))
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(self.total_steps)

        torch.manual_seed(cfg.seed)  # LoRA A's initialisation and, later, dropout
        self.model = load_model(model_dir, dtype=self.dtype, device=self.device,
                                quantize=None if cfg.quant == "none" else cfg.quant)
        self.lora_cfg, self.parent_lineage = self._attach_lora()
        self._after_lora()
        self.num_trainable = set_trainable(self.model)
        grad_ckpt = cfg.grad_checkpointing if cfg.grad_checkpointing is not None else self.device.type == "cuda"
        self.model.gradient_checkpointing = grad_ckpt
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay)

        resume_from = latest_checkpoint(self.output) if cfg.resume else None
        if cfg.resume and resume_from is None:
            raise InputError(f"--resume: no complete checkpoint in {self.output / 'checkpoints'}")
        self.output.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            state = load_checkpoint(resume_from, self.model, self.optimizer,
                                    lambda d: load_adapter_weights(self.model, d))
            self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
            self.bad_in_a_row = state["bad_in_a_row"]
        else:
            write_json(self.output / "config.json", cfg.to_json())
            reports = [r for r in (self.data.train_report, self.data.eval_report) if r is not None]
            write_json(self.output / "data_report.json", [r.__dict__ for r in reports])
        self._after_setup(resume_from)
        self.metrics = MetricsLog(self.output / "metrics.jsonl", resume_step=self.step if resume_from else None)

    def _load_data(self) -> None:
        """``self.data`` (train / eval samples and reports) and the training batch loader."""
        cfg = self.cfg
        self.data = load_sft_data(cfg.data, self.tokenizer, format=None if cfg.format == "auto" else cfg.format,
                                  max_len=self.max_len, length_policy=cfg.length_policy,
                                  train_on_prompt=cfg.train_on_prompt, eval_path=cfg.eval_data,
                                  eval_split=cfg.eval_split, seed=cfg.seed)
        pad_id = self.tokenizer.pad_token_id
        self.train_loader = BatchLoader(self.data.train, cfg.batch_size, pad_id=pad_id, seed=cfg.seed,
                                        pack=cfg.pack, max_len=self.max_len)

    def _after_lora(self) -> None:
        """Hook: the adapter is attached, the optimizer and any checkpoint not yet loaded."""

    def _after_setup(self, resume_from: Path | None) -> None:
        """Hook: the model, optimizer and (when resuming) checkpoint are loaded; training has not begun."""

    def _attach_lora(self) -> tuple[LoRAConfig, dict | None]:
        """A fresh adapter from the flags, or the one in --init-adapter (its own r, alpha, targets)."""
        cfg = self.cfg
        if cfg.init_adapter:
            lora_cfg = load_adapter(self.model, cfg.init_adapter)
            lora_cfg.dropout = cfg.lora_dropout  # dropout is a training choice, not part of the adapter
            for module in lora_modules(self.model).values():
                module.dropout = cfg.lora_dropout
            return lora_cfg, read_adapter_metadata(cfg.init_adapter)
        targets = "all-linear" if cfg.target_modules == "all-linear" else tuple(
            t.strip() for t in cfg.target_modules.split(",") if t.strip())
        lora_cfg = LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                              target_modules=targets, use_rslora=cfg.rslora)
        inject_lora(self.model, lora_cfg)
        return lora_cfg, None

    # ------------------------------------------------------------------ data position

    def _batches_from_position(self) -> Iterator[Batch]:
        """Micro-batches from the saved (epoch, batch index) on, across epochs, forever."""
        epoch, start = self.epoch, self.batch_index
        while True:
            for batch in self.train_loader.batches(epoch, start):
                yield batch
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------ one step

    def _accumulate(self, window: list[Batch]) -> tuple[float, int, dict[str, float]]:
        """Backward of one window: (mean loss, trainable tokens, extra metrics for the train line)."""
        loss, n_tokens = accumulate_gradients(self.model, window, self.device)
        return loss, n_tokens, {}

    def _window_sources(self, window: list[Batch]) -> list[str]:
        """"file:line" of every sample in the window (named when a step is skipped)."""
        return [self.data.train[i].source for b in window for row in b.sample_ids for i in row]

    def train_step(self, window: list[Batch]) -> dict[str, Any]:
        """One optimizer step over the micro-batches of one accumulation window."""
        loss, n_tokens, extra = self._accumulate(window)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm).item()
        lr = lr_at(self.step, peak=self.cfg.lr, warmup=self.warmup, total=self.total_steps,
                   schedule=self.cfg.lr_schedule)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": n_tokens, "finite": finite,
                "real_tokens": sum(int(b.attention_mask.sum()) for b in window), "metrics": extra,
                "samples": self._window_sources(window)}

    # ------------------------------------------------------------------ loop

    def train(self) -> dict[str, Any]:
        """Run to ``total_steps``; returns the final eval metrics (empty without an eval set)."""
        cfg = self.cfg
        previous_handler = self._install_sigterm()
        if self.step == 0 and self.data.eval:
            self._evaluate_and_log()
        batches = self._batches_from_position()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc="train",
                   unit="step", dynamic_ncols=True)
        self.model.train()
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                window = [next(batches) for _ in range(cfg.grad_accum)]
                result = self.train_step(window)
                self.step += 1
                last = window[-1]
                self.epoch, self.batch_index = last.epoch, last.index + 1
                elapsed = time.perf_counter() - started
                self._after_step(result, elapsed, bar)
                if self._stop_requested and self.step < self.total_steps:
                    path = self.save_checkpoint()
                    raise RunStopped(f"SIGTERM at step {self.step}: checkpoint saved in {path}; "
                                     f"continue with --resume", EXIT_PREEMPTED)
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, previous_handler)
        return self.finish()

    def _after_step(self, result: dict[str, Any], elapsed: float, bar: tqdm) -> None:
        cfg = self.cfg
        if not result["finite"]:
            self.bad_in_a_row += 1
            self.metrics.write("skip", self.step, loss=result["loss"], grad_norm=result["grad_norm"],
                               samples=result["samples"])
            if self.bad_in_a_row >= cfg.max_bad_steps:
                raise RunStopped(f"{self.bad_in_a_row} steps in a row with a non-finite loss or gradient, "
                                 f"the last at step {self.step} on samples {', '.join(result['samples'][:8])}",
                                 EXIT_DIVERGED)
        else:
            self.bad_in_a_row = 0
        tok_s = result["real_tokens"] / max(elapsed, 1e-9)
        if result["finite"] and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
            self.metrics.write("train", self.step, loss=result["loss"], lr=result["lr"],
                               grad_norm=result["grad_norm"], tokens=result["tokens"], tokens_per_s=tok_s,
                               epoch=self.epoch, **result["metrics"])
        bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{result['lr']:.2e}", tok_s=f"{tok_s:.0f}")
        bar.update(1)
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
            self._evaluate_and_log()
        if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
            self.save_checkpoint()

    # ------------------------------------------------------------------ eval, checkpoints, outputs

    def evaluate(self) -> dict[str, float]:
        """Mean loss per trainable token on the eval set, and its perplexity."""
        return mean_loss(self.model, self.data.eval, batch_size=self.cfg.batch_size,
                         pad_id=self.tokenizer.pad_token_id, device=self.device, progress=False).to_json()

    def _evaluate_and_log(self) -> dict[str, float]:
        result = self.evaluate()
        self.metrics.write("eval", self.step, **result)
        if self.progress:
            tqdm.write(f"step {self.step}: {self.eval_summary(result)}")
        return result

    def eval_summary(self, result: dict[str, float]) -> str:
        return f"eval loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}"

    def _adapter_metadata(self) -> dict[str, Any]:
        files = [self.cfg.data] + ([self.cfg.eval_data] if self.cfg.eval_data else [])
        return lineage(method=self.method, base_model=self.cfg.model, data_files=files, steps=self.step,
                       parent_adapter=self.cfg.init_adapter, parent_lineage=self.parent_lineage)

    def _write_adapter(self, folder: Path) -> None:
        save_adapter(self.model, self.lora_cfg, folder, self.cfg.model, metadata=self._adapter_metadata())

    def _write_checkpoint_files(self, adapter_folder: Path) -> None:
        """What a checkpoint holds beyond optimizer and RNG state: the adapter (DPO adds to it)."""
        self._write_adapter(adapter_folder)

    def save_checkpoint(self) -> Path:
        state = {"epoch": self.epoch, "batch_index": self.batch_index, "bad_in_a_row": self.bad_in_a_row,
                 "total_steps": self.total_steps}
        return save_checkpoint(self.output, self.step, self.model, self.optimizer, state,
                               self._write_checkpoint_files, keep=self.cfg.keep_checkpoints)

    def finish(self) -> dict[str, Any]:
        """Final eval, the adapter, the loss curve, and the completion marker (written last)."""
        final_eval = self._evaluate_and_log() if self.data.eval else {}
        self._write_adapter(self.output / "adapter")
        plot_loss_curve(self.output / "metrics.jsonl", self.output / "loss.png")
        summary = {"steps": self.step, "trainable_parameters": self.num_trainable, "eval": final_eval,
                   "adapter": str(self.output / "adapter")}
        self.metrics.write("summary", self.step, **summary)
        write_json(self.output / COMPLETE, summary)
        return final_eval

    def _install_sigterm(self):
        def request_stop(signum, frame):  # noqa: ARG001 - signal handler signature
            self._stop_requested = True
        return signal.signal(signal.SIGTERM, request_stop)
