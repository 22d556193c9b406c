"""The retention set (``--retain-data``): how much of the base model a run keeps, measured as it trains.

At step 0, at every evaluation and at the end, over the trainable tokens t of the retention
samples (N of them, every token of plain text; the completion tokens of SFT records)::

    retain/loss       = (1/N) Σ_t −log π(y_t | y_<t)                      the policy (adapters on)
    retain/base_loss  = (1/N) Σ_t −log π₀(y_t | y_<t)                     π₀: every adapter off
    retain/loss_delta = retain/loss − retain/base_loss                    > 0: forgetting
    retain/kl         = (1/N) Σ_t KL(π₀(·|y_<t) ‖ π(·|y_<t))

π₀ is always the original base: on a chain (``--init-adapter``) the starting adapter lives in the
same LoRA weights as the new training, and `engine.adapters.disable_adapters` switches it off
too. No second copy of the model exists; the base pass is the same model with its adapters off.

The base's loss is computed at the first measurement and cached; it is saved in every checkpoint
(``extras["retention"]``) and read back on ``--resume``, so a resumed run reports the same deltas
bit for bit. The KL needs the base's hidden states at every measurement (one forward with the
adapters off per batch, under no_grad); it goes through `kernels.linear_kl`, so the (N, V)
logits never exist on a GPU, and it is exactly 0 while the adapter computes nothing (B = 0). The
per-batch sums are `engine.kl_to_base`'s, the same as ``engine.eval``'s KL-to-base column.

Batches are padding-free (each a row of ``batch_size`` samples), shared by the ranks under
torchrun (`engine.run.distributed.evaluation_share`) and summed over them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.adapters import disable_adapters
from engine.data.batching import BatchLoader
from engine.data.samples import DataReport, Sample, check_vocabulary, load_samples
from engine.errors import InputError
from engine.kl_to_base import batch_loss_and_kl
from engine.losses.causal_lm import count_loss_tokens, loss_sum
from engine.run.checkpoint import load_extra
from engine.run.distributed import Parallel, evaluation_share

EXTRA = "retention"  # the checkpoint's retention.safetensors


class Retention:
    """The retention samples, and the base's loss on them once measured."""

    def __init__(self, samples: list[Sample], report: DataReport, batch_size: int, pad_id: int):
        if not samples:
            raise InputError(f"--retain-data {report.file}: no usable sample")
        self.samples, self.report, self.batch_size, self.pad_id = samples, report, batch_size, pad_id
        self.base_sum: torch.Tensor | None = None  # Σ_t −log π₀, float64, once measured
        self.tokens: int | None = None

    @classmethod
    def load(cls, cfg: Any, tokenizer: Any, max_len: int, vocab_size: int) -> Retention | None:
        """The ``--retain-data`` samples (any SFT format, truncated to ``max_len``), or None."""
        if not cfg.retain_data:
            return None
        samples, report = load_samples(cfg.retain_data, tokenizer, max_len=max_len, skip_invalid=False)
        check_vocabulary(samples, vocab_size, "--retain-data", cfg.retain_data)
        return cls(samples, report, cfg.batch_size, tokenizer.pad_token_id)

    @torch.no_grad()
    def measure(self, model: torch.nn.Module, device: torch.device, parallel: Parallel) -> dict[str, float]:
        """``retain/loss``, ``retain/base_loss``, ``retain/loss_delta`` and ``retain/kl`` of the
        model as it is now (in eval mode; every rank, in step)."""
        loader = BatchLoader(self.samples, self.batch_size, pad_id=self.pad_id, shuffle=False,
                             batching="padding-free")
        need_base = self.base_sum is None
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # Σ −log π, Σ KL, Σ −log π₀
        tokens = 0
        was_training = model.training
        model.eval()
        for index, counted in evaluation_share(parallel, loader.num_batches(0)):
            batch = loader.batch(0, index)
            part = self._batch_sums(model, batch.to(device), need_base)
            if counted:
                sums += part
                tokens += count_loss_tokens(batch)
        model.train(was_training)
        parallel.sum_(sums)
        tokens, = parallel.sum_ints([tokens])
        if tokens == 0:
            raise InputError(f"--retain-data {self.report.file}: no trainable tokens to measure")
        if need_base:
            self.base_sum, self.tokens = sums[2].cpu(), tokens
        loss_sum, kl_sum = sums[:2].tolist()
        loss, base = loss_sum / tokens, self.base_sum.item() / self.tokens
        return {"retain/loss": loss, "retain/base_loss": base, "retain/loss_delta": loss - base,
                "retain/kl": kl_sum / tokens, "retain/tokens": tokens}

    @staticmethod
    def _batch_sums(model: torch.nn.Module, batch: Any, need_base: bool) -> torch.Tensor:
        """(Σ −log π, Σ KL(π₀ ‖ π), Σ −log π₀ or 0) over one batch's trainable tokens, float64
        (`engine.kl_to_base.batch_loss_and_kl`; the base's loss costs one more base forward, once)."""
        policy = batch_loss_and_kl(model, batch)  # (2,): Σ −log π, Σ KL
        if not need_base:
            return torch.cat([policy, policy.new_zeros(1)])
        with disable_adapters(model):
            base = loss_sum(model, batch).double()
        return torch.cat([policy, base[None]])

    def summary(self, result: dict[str, Any]) -> str:
        """The retention part of the line printed at each evaluation."""
        return (f"retention loss {result['retain/loss']:.4f} ({result['retain/loss_delta']:+.4f} vs base), "
                f"KL to base {result['retain/kl']:.2e}")

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, torch.Tensor]:
        """The cached base numbers, for the checkpoint (empty before the first measurement)."""
        if self.base_sum is None:
            return {}
        return {"base_loss_sum": self.base_sum.reshape(1), "tokens": torch.tensor([self.tokens])}

    def restore(self, checkpoint: Path) -> None:
        """The base numbers a checkpoint was saved with (none if it was saved before step 0's)."""
        saved = load_extra(checkpoint, EXTRA)
        if saved:
            self.base_sum, self.tokens = saved["base_loss_sum"].reshape(()), int(saved["tokens"])
