"""Direct Preference Optimization with LoRA or QLoRA: ``train(cfg)``.

One optimizer step (`train_step`), top to bottom:

1. the window: ``grad_accum`` batches of B pairs, each ONE padded batch of 2B rows
   ``[c_1 … c_B, r_1 … r_B]`` (`engine.data.preferences.PairBatchLoader`, resumable like SFT's);
2. per batch (`pair_losses`): the reference log-probs, looked up per pair when precomputed, else
   one forward under ``torch.no_grad`` in eval mode with the reference policy active
   (`engine.recipes.dpo_reference`); then the policy's: one forward of the 2B rows,
   ``log π(y | x) = Σ_t log p(y_t | x, y_<t)`` over the completion tokens only, through the fused
   head (no (N, V) logits); IPO uses the per-token mean instead, as TRL does; then the per-pair
   losses (`engine.losses.preference`) and ``(Σ losses / pairs in the window).backward()``;
3. `engine.run.optimizer.Optimizer.step`: guard, clip, schedule, AdamW;
4. `engine.run.session.Run.end_step`: log, evaluate and checkpoint on schedule.

Metrics: train lines carry TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (means over the window's pairs); eval
lines carry ``loss`` and the same metrics prefixed ``eval/``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from engine.config import TrainConfig
from engine.data.batching import Batch
from engine.data.preferences import PairBatchLoader, load_dpo_data
from engine.errors import InputError
from engine.losses.causal_lm import completion_logps, count_loss_tokens
from engine.losses.preference import (
    IPO_MEANS_LOGPS,
    check_loss_options,
    dpo_losses,
    dpo_metrics,
    mean_metrics,
)
from engine.recipes.dpo_reference import ReferencePolicy, precompute_reference
from engine.run.checkpoint import load_extra
from engine.run.session import Run, StepResult

METHOD = "dpo"
REFERENCE_EXTRA = "reference_logps"  # checkpoint file of the precomputed reference log-probs


@dataclass
class DPOOptions:
    """DPO's own settings; `from_config` reads them from TrainConfig's ``dpo_*`` / ``precompute_ref``."""

    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    precompute_ref: bool = False

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> DPOOptions:
        return cls(beta=cfg.dpo_beta, loss=cfg.dpo_loss, label_smoothing=cfg.dpo_label_smoothing,
                   precompute_ref=cfg.precompute_ref)

    def validate(self) -> None:
        try:
            check_loss_options(self.loss, self.beta, self.label_smoothing)
        except ValueError as err:
            raise InputError(f"DPO options: {err}") from None


@dataclass
class PreferenceObjective:
    """What `pair_losses` needs besides the batch: the policy model, π_ref, the options and the
    precomputed reference tables (``{"train" | "eval": (pairs, 2)}``, empty when computed on the fly)."""

    model: torch.nn.Module
    reference: ReferencePolicy
    options: DPOOptions
    ref_tables: dict[str, torch.Tensor]


def pair_losses(obj: PreferenceObjective, batch: Batch, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses (B,) (differentiable when grad is on) and per-pair metrics of one pair batch."""
    half = batch.input_ids.shape[0] // 2
    if split in obj.ref_tables:
        table = obj.ref_tables[split][[row[0] for row in batch.sample_ids[:half]]].to(batch.input_ids.device)
        ref = torch.cat([table[:, 0], table[:, 1]])
    else:  # before the policy forward: no graph may hold LoRA weights while the reference swaps them
        ref, _ = obj.reference.logps(batch)
    policy, lengths = completion_logps(obj.model, batch)
    if obj.options.loss in IPO_MEANS_LOGPS:  # TRL: IPO on per-token mean log-probs
        policy, ref = policy / lengths.clamp(min=1), ref / lengths.clamp(min=1)
    pc, pr, rc, rr = policy[:half], policy[half:], ref[:half], ref[half:]
    beta = obj.options.beta
    losses = dpo_losses(pc, pr, rc, rr, beta=beta, loss_type=obj.options.loss,
                        label_smoothing=obj.options.label_smoothing)
    return losses, dpo_metrics(pc, pr, rc, rr, beta=beta)


def train_step(run: Run, obj: PreferenceObjective, window: list[Batch]) -> StepResult:
    """One optimizer step of DPO: each batch adds Σ losses / (pairs in the window) to the gradient."""
    n_pairs = sum(len(b.sample_ids) // 2 for b in window)
    total = torch.zeros((), dtype=torch.float32, device=run.device)
    parts = []
    for batch in window:
        losses, metrics = pair_losses(obj, batch.to(run.device), "train")
        (losses.sum() / n_pairs).backward()
        total += losses.detach().sum()
        parts.append(metrics)
    loss = (total / n_pairs).item()
    update = run.optimizer.step(loss, run.step)
    samples = [run.data.train[row[0]].source for b in window for row in b.sample_ids[:len(b.sample_ids) // 2]]
    return StepResult(loss, update, tokens=sum(count_loss_tokens(b) for b in window),
                      real_tokens=sum(int(b.attention_mask.sum()) for b in window), samples=samples,
                      metrics=mean_metrics(parts))


@torch.no_grad()
def evaluate(obj: PreferenceObjective, loader: PairBatchLoader, device: torch.device) -> dict[str, Any]:
    """Mean DPO loss over the held-out pairs and their metrics, prefixed ``eval/``."""
    was_training = obj.model.training
    obj.model.eval()
    total, pairs, parts = 0.0, 0, []
    for batch in loader.batches(0):
        losses, metrics = pair_losses(obj, batch.to(device), "eval")
        total += losses.sum().item()
        pairs += losses.numel()
        parts.append(metrics)
    obj.model.train(was_training)
    return {"loss": total / pairs, "pairs": pairs, **{f"eval/{k}": v for k, v in mean_metrics(parts).items()}}


def summarize(result: dict[str, Any]) -> str:
    return (f"eval loss {result['loss']:.4f}, reward accuracy {result['eval/rewards/accuracies']:.2f}, "
            f"margin {result['eval/rewards/margins']:.4f}")


def train(cfg: TrainConfig, progress: bool = True, options: DPOOptions | None = None) -> Run:
    """Train ``cfg.model`` by DPO on the preference pairs of ``cfg.data``; returns the finished run."""
    options = options or DPOOptions.from_config(cfg)
    options.validate()
    with Run.open(cfg, METHOD, progress) as run:
        run.data = load_dpo_data(cfg.data, run.tokenizer, max_len=run.max_len, length_policy=cfg.length_policy,
                                 eval_path=cfg.eval_data, eval_split=cfg.eval_split, seed=cfg.seed,
                                 skip_invalid=cfg.skip_invalid_records)
        pad_id = run.tokenizer.pad_token_id
        loader = PairBatchLoader(run.data.train, cfg.batch_size, pad_id=pad_id, seed=cfg.seed)
        eval_loader = PairBatchLoader(run.data.eval, cfg.batch_size, pad_id=pad_id, shuffle=False) \
            if run.data.eval else None
        run.plan(loader.num_batches(0))
        model = run.build_model().model
        obj = PreferenceObjective(model, ReferencePolicy(model, frozen_initial=cfg.init_adapter is not None),
                                  options, ref_tables={})
        run.lineage_extra["dpo"] = dict(asdict(options), reference="initial adapter (frozen)"
                                        if cfg.init_adapter else "base model")
        resumed_from = run.start([run.data.train_report, run.data.eval_report],
                                 (lambda: evaluate(obj, eval_loader, run.device)) if eval_loader else None,
                                 summarize)
        if options.precompute_ref:
            if resumed_from is not None:
                obj.ref_tables.update(load_extra(resumed_from, REFERENCE_EXTRA))
            else:
                for split, pairs in (("train", run.data.train), ("eval", run.data.eval)):
                    if pairs:
                        obj.ref_tables[split] = precompute_reference(
                            obj.reference, pairs, cfg.batch_size, pad_id, run.device,
                            f"reference log-probs ({split})", progress)
            run.extras[REFERENCE_EXTRA] = obj.ref_tables
        for window in run.windows(loader):
            run.end_step(train_step(run, obj, window))
        run.finish()
        return run
