"""Direct Preference Optimization with LoRA or QLoRA: `DPOTrainer`, an `SFTTrainer` with another loss.

One optimizer step, read top to bottom in `DPOTrainer.train_step`:

1. take the next ``grad_accum`` batches of B pairs, each ONE padded batch of 2B rows
   ``[c_1 … c_B, r_1 … r_B]`` (`engine.dpo_data.PairBatchLoader`, resumable like SFT's);
2. reference log-probs: looked up per pair index when precomputed, else one forward under
   ``torch.no_grad`` in eval mode with the reference policy active (below);
3. policy log-probs: one forward of the 2B rows, ``log π(y | x) = Σ_t log p(y_t | x, y_<t)`` over the
   completion tokens only (labels -100 on the prompt), through the fused head
   (`kernels.linear_cross_entropy.sequence_logprobs`: no (N, V) logits); IPO uses the per-token
   mean instead, as TRL does;
4. per-pair losses (`engine.dpo_loss`), ``(Σ losses / pairs in the window).backward()``;
5. then exactly SFT's step: skip non-finite steps, clip, schedule, AdamW; log, eval, checkpoint.

The reference policy π_ref is never a second copy of the weights:

* a fresh adapter: π_ref is the base model, i.e. the same model inside
  `engine.lora.disable_adapters` (every LoRALinear computes its frozen base only);
* ``--init-adapter DIR`` (continued training, e.g. DPO after SFT): π_ref is the starting policy,
  base + the initial adapter, frozen. Its A, B are kept as frozen copies (adapter-sized, no base
  weights) and copied into the live LoRA parameters under ``torch.no_grad`` for the reference
  forward, the trained values being copied back bitwise right after. This happens before the
  policy forward of each micro-batch, so no autograd graph ever sees the swap.

``precompute_ref`` scores every training and eval pair with π_ref once, before the first step,
and keeps the log-probs per pair index (2 floats per pair); they are saved in every checkpoint
(``reference_logps.safetensors``) so a resumed run uses the very same numbers.

Metrics: train lines carry SFT's fields plus TRL's ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (means over the
window's pairs); eval lines carry ``loss`` and the same metrics prefixed ``eval/``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engine.batching import Batch
from engine.config import TrainConfig
from engine.data_render import IGNORE
from engine.dpo_data import PairBatchLoader, load_dpo_data
from engine.dpo_loss import (
    IPO_MEANS_LOGPS,
    check_loss_options,
    dpo_losses,
    dpo_metrics,
    mean_metrics,
)
from engine.errors import InputError
from engine.lora import disable_adapters, lora_modules
from engine.sft import SFTTrainer
from kernels.linear_cross_entropy import sequence_logprobs

REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class DPOOptions:
    """DPO's own settings; `from_config` reads them from TrainConfig's ``dpo_*`` / ``precompute_ref``."""

    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    precompute_ref: bool = False

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "DPOOptions":
        return cls(beta=cfg.dpo_beta, loss=cfg.dpo_loss, label_smoothing=cfg.dpo_label_smoothing,
                   precompute_ref=cfg.precompute_ref)

    def validate(self) -> None:
        try:
            check_loss_options(self.loss, self.beta, self.label_smoothing)
        except ValueError as err:
            raise InputError(f"DPO options: {err}") from None


def completion_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t log p(y_t | y_<t) over each row's completion tokens (rows,) fp32, completion lengths (rows,)).

    Hidden state t predicts token t + 1, so the labels are shifted by one; prompt and padding
    labels are -100 and add nothing.
    """
    hidden = model.hidden_states(batch.input_ids, batch.attention_mask, batch.position_ids)
    labels = batch.labels[:, 1:]
    logps = sequence_logprobs(hidden[:, :-1], model.lm_head.weight, labels, IGNORE)
    return logps, (labels != IGNORE).sum(1)


class ReferencePolicy:
    """π_ref on the training model itself: adapters off, or the frozen initial adapter swapped in."""

    def __init__(self, model: torch.nn.Module, frozen_initial: bool):
        self.model = model
        self.initial = None
        if frozen_initial:  # copies of A and B only: r·(in + out) numbers per adapted linear
            self.initial = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone())
                            for n, m in lora_modules(model).items()}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.initial is None:
            with disable_adapters(self.model):
                yield
            return
        modules = lora_modules(self.model)
        with torch.no_grad():
            trained = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in modules.items()}
            for name, (a, b) in self.initial.items():
                modules[name].lora_A.copy_(a)
                modules[name].lora_B.copy_(b)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, (a, b) in trained.items():
                    modules[name].lora_A.copy_(a)
                    modules[name].lora_B.copy_(b)

    @torch.no_grad()
    def logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """`completion_logps` of π_ref, in eval mode (no dropout, no RNG drawn)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.active():
                return completion_logps(self.model, batch)
        finally:
            self.model.train(was_training)


class DPOTrainer(SFTTrainer):
    """A LoRA / QLoRA DPO run: SFT's loop, checkpoints, resume and outputs, with preference data and loss."""

    method = "dpo"

    def __init__(self, cfg: TrainConfig, progress: bool = True, options: DPOOptions | None = None):
        super().__init__(cfg, progress)
        self.options = options or DPOOptions.from_config(cfg)
        self.options.validate()
        self.ref_logps: dict[str, torch.Tensor] = {}  # "train" / "eval" -> (pairs, 2) [chosen, rejected]

    # ------------------------------------------------------------------ setup (SFTTrainer.setup's hooks)

    def _after_lora(self) -> None:
        self.reference = ReferencePolicy(self.model, frozen_initial=self.cfg.init_adapter is not None)

    def _after_setup(self, resume_from: Path | None) -> None:
        self._prepare_reference(resume_from)

    def _load_data(self) -> None:
        cfg = self.cfg
        self.data = load_dpo_data(cfg.data, self.tokenizer, max_len=self.max_len, length_policy=cfg.length_policy,
                                  eval_path=cfg.eval_data, eval_split=cfg.eval_split, seed=cfg.seed)
        pad_id = self.tokenizer.pad_token_id
        self.train_loader = PairBatchLoader(self.data.train, cfg.batch_size, pad_id=pad_id, seed=cfg.seed)
        self.eval_loader = (PairBatchLoader(self.data.eval, cfg.batch_size, pad_id=pad_id, shuffle=False)
                            if self.data.eval else None)

    def _prepare_reference(self, resume_from: Path | None) -> None:
        """With precompute_ref: the reference log-probs of every pair, from the checkpoint or computed now."""
        if not self.options.precompute_ref:
            return
        if resume_from is not None:
            self.ref_logps = load_file(str(resume_from / REFERENCE_FILE))
            return
        splits = {"train": self.data.train, "eval": self.data.eval}
        for split, pairs in splits.items():
            if not pairs:
                continue
            loader = PairBatchLoader(pairs, self.cfg.batch_size, pad_id=self.tokenizer.pad_token_id, shuffle=False)
            table = torch.empty(len(pairs), 2, dtype=torch.float32)
            for batch in tqdm(loader.batches(0), total=loader.num_batches(0), disable=not self.progress,
                              desc=f"reference log-probs ({split})", leave=False):
                logps, _ = self.reference.logps(batch.to(self.device))
                half = logps.shape[0] // 2
                ids = [row[0] for row in batch.sample_ids[:half]]
                table[ids] = torch.stack([logps[:half], logps[half:]], 1).cpu()
            self.ref_logps[split] = table

    # ------------------------------------------------------------------ the DPO loss of one batch

    def batch_losses(self, batch: Batch, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses (B,) (differentiable when grad is on) and per-pair metrics of one pair batch."""
        half = batch.input_ids.shape[0] // 2
        if split in self.ref_logps:
            ids = [row[0] for row in batch.sample_ids[:half]]
            table = self.ref_logps[split][ids].to(self.device)
            ref = torch.cat([table[:, 0], table[:, 1]])
        else:  # before the policy forward: no graph may hold LoRA weights while the reference swaps them
            ref, _ = self.reference.logps(batch)
        policy, lengths = completion_logps(self.model, batch)
        if self.options.loss in IPO_MEANS_LOGPS:  # TRL: IPO on per-token mean log-probs
            policy, ref = policy / lengths.clamp(min=1), ref / lengths.clamp(min=1)
        pc, pr, rc, rr = policy[:half], policy[half:], ref[:half], ref[half:]
        losses = dpo_losses(pc, pr, rc, rr, beta=self.options.beta, loss_type=self.options.loss,
                            label_smoothing=self.options.label_smoothing)
        return losses, dpo_metrics(pc, pr, rc, rr, beta=self.options.beta)

    def _accumulate(self, window: list[Batch]) -> tuple[float, int, dict[str, float]]:
        """Backward of one window: each batch adds Σ losses / (pairs in the window). Returns
        (mean loss, completion tokens, mean metrics)."""
        n_pairs = sum(len(b.sample_ids) // 2 for b in window)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        parts = []
        for batch in window:
            losses, metrics = self.batch_losses(batch.to(self.device), "train")
            (losses.sum() / n_pairs).backward()
            total += losses.detach().sum()
            parts.append(metrics)
        return (total / n_pairs).item(), sum(b.num_trainable for b in window), mean_metrics(parts)

    def _window_sources(self, window: list[Batch]) -> list[str]:
        return [self.data.train[row[0]].source for b in window for row in b.sample_ids[:len(b.sample_ids) // 2]]

    # ------------------------------------------------------------------ eval, checkpoints, outputs

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean DPO loss over the held-out pairs and their metrics, prefixed ``eval/``."""
        was_training = self.model.training
        self.model.eval()
        total, pairs, parts = 0.0, 0, []
        for batch in self.eval_loader.batches(0):
            losses, metrics = self.batch_losses(batch.to(self.device), "eval")
            total += losses.sum().item()
            pairs += losses.numel()
            parts.append(metrics)
        self.model.train(was_training)
        return {"loss": total / pairs, "pairs": pairs, **{f"eval/{k}": v for k, v in mean_metrics(parts).items()}}

    def eval_summary(self, result: dict[str, float]) -> str:
        return (f"eval loss {result['loss']:.4f}, reward accuracy {result['eval/rewards/accuracies']:.2f}, "
                f"margin {result['eval/rewards/margins']:.4f}")

    def _adapter_metadata(self) -> dict[str, Any]:
        record = super()._adapter_metadata()
        record["dpo"] = dict(asdict(self.options),
                             reference="initial adapter (frozen)" if self.cfg.init_adapter else "base model")
        return record

    def _write_checkpoint_files(self, adapter_folder: Path) -> None:
        """The checkpoint's adapter, plus the precomputed reference log-probs beside it."""
        self._write_adapter(adapter_folder)
        if self.ref_logps:
            save_file({k: v.contiguous() for k, v in self.ref_logps.items()},
                      str(adapter_folder.parent / REFERENCE_FILE))
