"""Direct Preference Optimization with LoRA or QLoRA: ``train(cfg)``.

One optimizer step (`train_step`), top to bottom:

1. the window: ``grad_accum`` batches of B pairs, each ONE batch of the 2B documents
   ``[c_1 … c_B, r_1 … r_B]`` (`engine.data.pair_batching.PairBatchLoader`, resumable like SFT's):
   by default one padding-free row (each document its own segment, nothing padded), else 2B
   padded rows (``--batching padded``) or rows packed to ``--max-len`` (``--pack``);
2. per batch (`pair_losses`): the reference log-probs, looked up per pair when precomputed, else
   one forward under ``torch.no_grad`` in eval mode with the reference policy active
   (`engine.recipes.dpo_reference`); then the policy's: one forward of the 2B documents,
   ``log π(y | x) = Σ_t log p(y_t | x, y_<t)`` over each document's completion tokens only
   (per segment in a padding-free or packed row), through the fused head (no (N, V) logits); IPO
   uses the per-token mean instead, as TRL does; then

       loss = Σ_pairs ℓ_DPO / P  +  α · Σ_chosen tokens −log π(y_t) / N_c

   with P the pairs and N_c the chosen answers' tokens of the whole window (α = ``--rpo-alpha``,
   TRL's RPO: an NLL term that keeps the chosen answers likely), and ``loss.backward()``;
3. `engine.run.optimizer.Optimizer.step`: guard, clip, schedule, AdamW;
4. `engine.run.session.Run.end_step`: log, evaluate and checkpoint on schedule; then the
   likelihood-displacement watch (`engine.recipes.dpo_monitor`).

Metrics: train lines carry TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (means over the window's pairs), the
per-token ``logps/chosen_per_token`` / ``logps/rejected_per_token`` and, with RPO, ``nll_loss``;
eval lines carry ``loss`` and the same metrics prefixed ``eval/``, plus ``eval/kl``: the mean
per-token KL(π ‖ π_ref) over the held-out completions, exact over the vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from engine.config import TrainConfig
from engine.data.batching import Batch
from engine.data.batching_report import dpo_batching_report
from engine.data.pair_batching import pair_loaders
from engine.data.preferences import PairBatchLoader, load_dpo_data
from engine.errors import InputError
from engine.losses.causal_lm import (
    completion_kl,
    completion_logps,
    count_loss_tokens,
    document_loss_tokens,
    hidden_logps,
    hidden_states,
)
from engine.losses.preference import (
    IPO_MEANS_LOGPS,
    check_loss_options,
    dpo_losses,
    dpo_metrics,
    mean_metrics,
)
from engine.recipes.dpo_monitor import DisplacementMonitor
from engine.recipes.dpo_reference import ReferencePolicy, precompute_reference
from engine.run.checkpoint import load_extra
from engine.run.distributed import Parallel, evaluation_share
from engine.run.metrics import read_metrics
from engine.run.session import Run, StepResult

METHOD = "dpo"
REFERENCE_EXTRA = "reference_logps"  # checkpoint file of the precomputed reference log-probs


@dataclass
class DPOOptions:
    """DPO's own settings; `from_config` reads them from TrainConfig's ``dpo_*``, ``rpo_alpha`` and
    ``precompute_ref``."""

    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    precompute_ref: bool = False
    rpo_alpha: float = 0.0
    warn_chosen_drop: float = 0.5  # nats per token; 0: no likelihood-displacement warning

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> DPOOptions:
        return cls(beta=cfg.dpo_beta, loss=cfg.dpo_loss, label_smoothing=cfg.dpo_label_smoothing,
                   precompute_ref=cfg.precompute_ref, rpo_alpha=cfg.rpo_alpha,
                   warn_chosen_drop=cfg.dpo_warn_chosen_drop)

    def validate(self) -> None:
        try:
            check_loss_options(self.loss, self.beta, self.label_smoothing)
        except ValueError as err:
            raise InputError(f"DPO options: {err}") from None
        if not self.rpo_alpha >= 0:
            raise InputError(f"DPO options: rpo alpha must be >= 0, got {self.rpo_alpha}")

    def loss_label(self) -> str:
        text = f"DPO loss ({self.loss}, β = {self.beta:g})"
        return text + f" + {self.rpo_alpha:g} · chosen NLL" if self.rpo_alpha else text


@dataclass
class PreferenceObjective:
    """What `pair_losses` needs besides the batch: the policy model, π_ref, the options and the
    precomputed reference tables (``{"train" | "eval": (pairs, 2)}``, empty when computed on the fly)."""

    model: torch.nn.Module
    reference: ReferencePolicy
    options: DPOOptions
    ref_tables: dict[str, torch.Tensor]

    def table_logps(self, batch: Batch, split: str) -> torch.Tensor | None:
        """The precomputed π_ref log-probs of the batch's 2B documents, or None."""
        if split not in self.ref_tables:
            return None
        table = self.ref_tables[split][batch_pairs(batch)].to(batch.input_ids.device)
        return torch.cat([table[:, 0], table[:, 1]])


def batch_pairs(batch: Batch) -> list[int]:
    """The B pairs of a batch, in order: the owners of its first B documents ``c_1 … c_B``."""
    owners = [pair for row in batch.sample_ids for pair in row]  # (2B,) row-major = document order
    return owners[:len(owners) // 2]


def losses_from_logps(options: DPOOptions, policy: torch.Tensor, ref: torch.Tensor,
                      lengths: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DPO losses (B,) and metrics from the 2B documents' summed log-probs and token counts."""
    half = policy.shape[0] // 2
    metrics = dpo_metrics(policy[:half], policy[half:], ref[:half], ref[half:], beta=options.beta,
                          chosen_tokens=lengths[:half], rejected_tokens=lengths[half:])
    if options.loss in IPO_MEANS_LOGPS:  # TRL: IPO on per-token mean log-probs
        policy, ref = policy / lengths.clamp(min=1), ref / lengths.clamp(min=1)
    losses = dpo_losses(policy[:half], policy[half:], ref[:half], ref[half:], beta=options.beta,
                        loss_type=options.loss, label_smoothing=options.label_smoothing)
    return losses, metrics


def pair_losses(obj: PreferenceObjective, batch: Batch,
                split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(per-pair DPO losses (B,), per-pair metrics, the chosen documents' summed log-probs (B,)), the
    first and last differentiable when grad is on."""
    ref = obj.table_logps(batch, split)
    if ref is None:  # before the policy forward: no graph may hold LoRA weights while the reference swaps them
        ref, _ = obj.reference.logps(batch)
    policy, lengths = completion_logps(obj.model, batch)
    losses, metrics = losses_from_logps(obj.options, policy, ref, lengths)
    return losses, metrics, policy[:policy.shape[0] // 2]


def chosen_tokens(batch: Batch) -> int:
    """Completion tokens of the batch's chosen documents (the first half), as its loader counted
    them on the host (else counted on the batch)."""
    if batch.document_tokens is not None:
        return sum(batch.document_tokens[:batch.num_documents // 2])
    return int(document_loss_tokens(batch)[:batch.num_documents // 2].sum())


def train_step(run: Run, obj: PreferenceObjective, window: list[Batch]) -> StepResult:
    """One optimizer step of DPO (with RPO's chosen NLL when ``rpo_alpha`` > 0) over one window."""
    parallel = run.parallel  # under torchrun: this rank's share of the step, counts summed over the ranks
    local_pairs = sum(b.num_documents // 2 for b in window)
    n_pairs, n_chosen, n_tokens, real_tokens = parallel.sum_ints([
        local_pairs, sum(chosen_tokens(b) for b in window),
        sum(count_loss_tokens(b) for b in window), sum(b.real_tokens for b in window)])
    n_chosen = max(n_chosen, 1)
    alpha = obj.options.rpo_alpha
    total = torch.zeros((), dtype=torch.float32, device=run.device)
    nll = torch.zeros((), dtype=torch.float32, device=run.device)
    parts = []
    for batch in parallel.micro_batches(window, run.cfg.seed):
        losses, metrics, chosen_logps = pair_losses(obj, batch.to(run.device), "train")
        batch_nll = -chosen_logps.sum() / n_chosen
        parallel.backward(losses.sum() / n_pairs + alpha * batch_nll)
        total += losses.detach().sum() / n_pairs + alpha * batch_nll.detach()
        nll += batch_nll.detach()
        parts.append(metrics)
    total, nll = parallel.sum_(torch.stack([total, nll])).unbind()  # one all-reduce for both
    update = run.optimizer.step(total, run.step)  # loss and metrics stay on the device (Run reads them)
    samples = [run.data.train[pair].source for b in window for pair in batch_pairs(b)]
    metrics = parallel.weighted_sum(mean_metrics(parts, on_host=False), local_pairs / n_pairs)  # over all pairs
    metrics |= {"nll_loss": nll} if alpha else {}
    return StepResult(total, update, tokens=n_tokens, real_tokens=real_tokens, samples=samples, metrics=metrics)


@torch.no_grad()
def evaluate(obj: PreferenceObjective, loader: PairBatchLoader, device: torch.device,
             parallel: Parallel | None = None) -> dict[str, Any]:
    """Mean DPO loss over the held-out pairs, their metrics prefixed ``eval/``, and ``eval/kl``.
    Under torchrun the ranks share the batches (`evaluation_share`) and sum what they counted."""
    was_training = obj.model.training
    obj.model.eval()
    sums: dict[str, torch.Tensor] = {}  # per-pair metrics summed; loss, pairs, KL and its positions beside them
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for index, counted in evaluation_share(parallel, loader.num_batches(0)):
        batch = loader.batch(0, index).to(device)
        ref_hidden = obj.reference.hidden_states(batch)
        hidden = hidden_states(obj.model, batch)
        weight = obj.model.lm_head.weight  # read after the forward: under FSDP2 the root's whole weight then
        policy, lengths = hidden_logps(hidden, weight, batch)
        ref = obj.table_logps(batch, "eval")
        ref = hidden_logps(ref_hidden, weight, batch)[0] if ref is None else ref
        losses, metrics = losses_from_logps(obj.options, policy, ref, lengths)
        kl, n = completion_kl(hidden, ref_hidden, weight, batch)
        if counted:
            totals += torch.tensor([losses.sum().item(), losses.numel(), kl, n], dtype=torch.float64, device=device)
            for name, values in metrics.items():
                sums[name] = sums.get(name, 0) + values.double().sum()
    obj.model.train(was_training)
    names = list(metrics)  # every batch has the same metrics
    summed = torch.cat([totals, torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64, device=device)
                                             for k in names])])
    if parallel is not None:
        parallel.sum_(summed)
    loss_sum, pairs, kl_sum, kl_tokens, *metric_sums = summed.tolist()
    return {"loss": loss_sum / pairs, "pairs": int(pairs),
            **{f"eval/{k}": v / pairs for k, v in zip(names, metric_sums)}, "eval/kl": kl_sum / max(kl_tokens, 1)}


def summarize(result: dict[str, Any]) -> str:
    at_reference = result["eval/rewards/chosen"] == 0 and result["eval/rewards/rejected"] == 0
    accuracy = "n/a (policy = reference)" if at_reference else f"{result['eval/rewards/accuracies']:.2f}"
    return (f"eval loss {result['loss']:.4f}, reward accuracy {accuracy}, margin {result['eval/rewards/margins']:.4f}, "
            f"chosen log-likelihood {result['eval/logps/chosen_per_token']:.3f} nats/token, "
            f"KL to the reference {result['eval/kl']:.4f}")


def train(cfg: TrainConfig, progress: bool = True, options: DPOOptions | None = None) -> Run:
    """Train ``cfg.model`` by DPO on the preference pairs of ``cfg.data``; returns the finished run."""
    options = options or DPOOptions.from_config(cfg)
    options.validate()
    with Run.open(cfg, METHOD, progress) as run:
        run.data = load_dpo_data(cfg.data, run.tokenizer, max_len=run.max_len, length_policy=cfg.length_policy,
                                 eval_path=cfg.eval_data, eval_split=cfg.eval_split, seed=cfg.seed,
                                 skip_invalid=cfg.skip_invalid_records)
        pad_id = run.tokenizer.pad_token_id
        layout = {"batching": cfg.batching, "max_len": run.max_len}  # also the reference precomputation's
        loader, eval_loader = pair_loaders(run.data.train, run.data.eval, cfg.batch_size, pad_id=pad_id,
                                           seed=cfg.seed, batching=cfg.batching, max_len=run.max_len,
                                           max_tokens=cfg.max_tokens_per_batch)
        run.plan(loader.num_batches(0))
        model = run.build_model().model
        obj = PreferenceObjective(model, ReferencePolicy(model, frozen_initial=cfg.init_adapter is not None),
                                  options, ref_tables={})
        run.lineage_extra["dpo"] = dict(asdict(options), reference="initial adapter (frozen)"
                                        if cfg.init_adapter else "base model")
        run.loss_label = options.loss_label()
        monitor = DisplacementMonitor(options.warn_chosen_drop)

        def evaluate_and_watch() -> dict[str, Any]:
            result = evaluate(obj, eval_loader, run.device, run.parallel)
            warning = monitor.observe(result["eval/logps/chosen_per_token"], result["eval/rewards/margins"],
                                      result["eval/kl"])
            if warning:
                run.warn(warning)
            return result

        resumed_from = run.start([run.data.train_report, run.data.eval_report, dpo_batching_report(loader)],
                                 evaluate_and_watch if eval_loader else None, summarize)
        if resumed_from is not None:
            monitor.resume(read_metrics(run.output / "metrics.jsonl"), with_eval=eval_loader is not None)
        if options.precompute_ref:
            if resumed_from is not None:
                obj.ref_tables.update(load_extra(resumed_from, REFERENCE_EXTRA))
            else:
                for split, pairs in (("train", run.data.train), ("eval", run.data.eval)):
                    if pairs:
                        obj.ref_tables[split] = precompute_reference(
                            obj.reference, pairs, cfg.batch_size, pad_id, run.device,
                            f"reference log-probs ({split})", run.progress, **layout)
            run.extras[REFERENCE_EXTRA] = obj.ref_tables
        for window in run.windows(loader):
            for record in run.end_step(train_step(run, obj, window)):  # the steps read on the host now
                if eval_loader is None and record.applied:
                    warning = monitor.observe(record.metrics["logps/chosen_per_token"],
                                              record.metrics["rewards/margins"], smooth=True)
                    if warning:
                        run.warn(warning)
        run.finish()
        return run
