"""A reward model with LoRA or QLoRA: ``train(cfg)``, a scalar head trained on preference pairs.

The model is the base with a LoRA adapter and the head ``score`` (`engine.adapters.score_head`,
w (1, H), HF's initialisation seeded by ``--seed``), built before the model is wrapped (DDP) or
sharded (FSDP2), trained together. It reads the preference data DPO reads
(`engine.data.preferences`, with each record's optional numeric ``margin``).

One optimizer step (`train_step`), top to bottom:

1. the window: ``grad_accum`` batches of B pairs, each ONE batch of the 2B documents
   ``[c_1 … c_B, r_1 … r_B]`` (`engine.data.pair_batching.PairBatchLoader`, resumable like DPO's),
   padding-free by default, padded or packed;
2. per batch (`pair_losses`): one forward of the 2B documents, each scored at its last token
   (prompt + completion, i.e. its EOS / end-of-turn token): ``r = h_last · wᵀ``
   (`engine.losses.reward`; the positions found on the CPU batch, no host read), then

       loss = Σ_pairs −log σ(r_c − r_r − m) / P

   with P the pairs of the whole window (summed over the ranks under torchrun), and
   ``loss.backward()``;
3. `engine.run.optimizer.Optimizer.step`: guard, clip, schedule, AdamW (LoRA and head);
4. `engine.run.session.Run.end_step`: log, evaluate and checkpoint on schedule.

Metrics: train lines carry ``accuracy`` (the fraction of the window's pairs with r_c > r_r) and
``margin`` (the mean r_c − r_r); eval lines ``loss`` and ``eval/accuracy``, ``eval/margin`` over the
held-out pairs. The step-0 evaluation is the untrained head's.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.config import TrainConfig
from engine.data.batching import Batch
from engine.data.batching_report import dpo_batching_report
from engine.data.pair_batching import pair_loaders
from engine.data.preferences import PairBatchLoader, PreferencePair, load_dpo_data
from engine.losses.preference import mean_metrics
from engine.losses.reward import bradley_terry_losses, last_token_index, reward_metrics, sequence_rewards
from engine.recipes.dpo import batch_pairs
from engine.run.distributed import Parallel, evaluation_share
from engine.run.session import Run, StepResult

METHOD = "reward"
LOSS_LABEL = "Bradley–Terry loss (nats / pair)"


def pair_margins(pairs: list[PreferencePair], batch: Batch) -> torch.Tensor:
    """(B,) fp32 on the CPU: the records' margins of the batch's pairs, in order."""
    return torch.tensor([pairs[p].margin for p in batch_pairs(batch)], dtype=torch.float32)


def pair_losses(model: torch.nn.Module, batch: Batch, margins: torch.Tensor,
                device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair losses (B,), per-pair metrics) of a CPU batch of pairs; the losses differentiable
    when grad is on."""
    last = last_token_index(batch)  # on the CPU batch: the loader's layout, no device op
    rewards = sequence_rewards(model, batch.to(device), last.to(device))  # (2B,) = [r_c…, r_r…]
    chosen, rejected = rewards.chunk(2)
    return bradley_terry_losses(chosen, rejected, margins.to(device)), reward_metrics(chosen, rejected)


def train_step(run: Run, window: list[Batch]) -> StepResult:
    """One optimizer step of the reward model over one window."""
    parallel = run.parallel  # under torchrun: this rank's share of the step, counts summed over the ranks
    local_pairs = sum(b.num_documents // 2 for b in window)
    n_pairs, real_tokens = parallel.sum_ints([local_pairs, sum(b.real_tokens for b in window)])
    total = torch.zeros((), dtype=torch.float32, device=run.device)
    parts = []
    for batch in parallel.micro_batches(window, run.cfg.seed):
        losses, metrics = pair_losses(run.model, batch, pair_margins(run.data.train, batch), run.device)
        parallel.backward(losses.sum() / n_pairs)
        total += losses.detach().sum() / n_pairs
        parts.append(metrics)
    parallel.sum_(total)
    update = run.optimizer.step(total, run.step)  # loss and metrics stay on the device (Run reads them)
    samples = [run.data.train[pair].source for b in window for pair in batch_pairs(b)]
    metrics = parallel.weighted_sum(mean_metrics(parts, on_host=False), local_pairs / n_pairs)  # over all pairs
    # "tokens": every token of the pairs feeds their scores (the loss is normalised by pairs, not tokens)
    return StepResult(total, update, tokens=real_tokens, real_tokens=real_tokens, samples=samples, metrics=metrics)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: PairBatchLoader, device: torch.device,
             parallel: Parallel | None = None) -> dict[str, Any]:
    """Mean Bradley–Terry loss over the held-out pairs, ``eval/accuracy`` and ``eval/margin``.
    Under torchrun the ranks share the batches (`evaluation_share`) and sum what they counted."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # Σ loss, pairs, Σ accuracy, Σ margin
    for index, counted in evaluation_share(parallel, loader.num_batches(0)):
        batch = loader.batch(0, index)
        losses, metrics = pair_losses(model, batch, pair_margins(loader.pairs, batch), device)
        if counted:
            totals += torch.stack([losses.sum(), torch.tensor(float(losses.numel()), device=device),
                                   metrics["accuracy"].sum(), metrics["margin"].sum()]).double()
    model.train(was_training)
    if parallel is not None:
        parallel.sum_(totals)
    loss_sum, pairs, correct, margin_sum = totals.tolist()
    return {"loss": loss_sum / pairs, "pairs": int(pairs), "eval/accuracy": correct / pairs,
            "eval/margin": margin_sum / pairs}


def summarize(result: dict[str, Any]) -> str:
    return (f"eval loss {result['loss']:.4f}, pairwise accuracy {result['eval/accuracy']:.3f} "
            f"over {result['pairs']} pairs, mean margin {result['eval/margin']:.4f}")


def train(cfg: TrainConfig, progress: bool = True) -> Run:
    """Train a reward model on ``cfg.model`` from the preference pairs of ``cfg.data``; returns the
    finished run (its adapter folder: LoRA + head, loadable by PEFT as sequence classification)."""
    with Run.open(cfg, METHOD, progress) as run:
        run.data = load_dpo_data(cfg.data, run.tokenizer, max_len=run.max_len, length_policy=cfg.length_policy,
                                 eval_path=cfg.eval_data, eval_split=cfg.eval_split, seed=cfg.seed,
                                 skip_invalid=cfg.skip_invalid_records)
        pad_id = run.tokenizer.pad_token_id
        loader, eval_loader = pair_loaders(run.data.train, run.data.eval, cfg.batch_size, pad_id=pad_id,
                                           seed=cfg.seed, batching=cfg.batching, max_len=run.max_len,
                                           max_tokens=cfg.max_tokens_per_batch)
        run.plan(loader.num_batches(0))
        run.build_model(with_score_head=True)  # the head exists before DDP / FSDP2 see the model
        run.loss_label = LOSS_LABEL
        with_margins = sum(p.margin != 0 for p in run.data.train)
        run.lineage_extra[METHOD] = {"head": "score", "pooling": "last token", "loss": "bradley-terry",
                                     "pairs_with_margin": with_margins, "max_len": run.max_len}

        def evaluate_run() -> dict[str, Any]:
            return evaluate(run.model, eval_loader, run.device, run.parallel)

        run.start([run.data.train_report, run.data.eval_report, dpo_batching_report(loader)],
                  evaluate_run if eval_loader else None, summarize)
        for window in run.windows(loader):
            run.end_step(train_step(run, window))
        run.finish()
        return run
