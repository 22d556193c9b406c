"""Supervised fine-tuning with LoRA or QLoRA: ``train(cfg)``.

One optimizer step (`train_step`), top to bottom:

1. the window: ``grad_accum`` micro-batches in the epoch order (a pure function of seed and epoch,
   so the data position is all a resume needs), and N = its trainable tokens (shifted labels
   that are not -100);
2. per micro-batch: ``loss_sum`` = Σ CE(h[:, :-1] W_headᵀ, labels[:, 1:]) through the fused
   linear + cross-entropy (`engine.losses.causal_lm`), and ``(loss_sum / N).backward()``: the
   accumulated gradient is exactly that of one batch holding the whole window, however it is split;
3. `engine.run.optimizer.Optimizer.step`: a non-finite loss or gradient never reaches the
   weights (the step is skipped and logged), else clip, schedule, AdamW;
4. `engine.run.session.Run.end_step`: log, evaluate and checkpoint on schedule.

Against forgetting (`mixed_window` and `mitigated_step`, only when asked): ``--replay-data`` appends general samples
to the window's micro-batches (`engine.data.replay`: the fraction ``--replay-ratio`` of all
samples, in a resumable order), and ``--kl-to-base β`` adds β · KL(base ‖ policy) per trained token
(`engine.losses.anchored`). The train line's ``loss`` stays the training data's mean loss;
``replay/loss``, ``kl_to_base`` and ``objective`` (what the step minimised) come beside it.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.config import TrainConfig
from engine.data.batching import Batch, BatchLoader
from engine.data.batching_report import sft_batching_report
from engine.data.replay import Mixed, ReplayMix
from engine.data.samples import load_sft_data
from engine.losses.anchored import anchored_sums
from engine.losses.causal_lm import count_loss_tokens, loss_sum, mean_loss
from engine.run.checkpoint import load_extra
from engine.run.distributed import Parallel
from engine.run.session import Run, StepResult

METHOD = "sft"
REPLAY = "replay"  # the checkpoint's replay.safetensors


def backward_window(model: torch.nn.Module, window: list[Batch], device: torch.device,
                    parallel: Parallel | None = None, seed: int | None = None) -> tuple[torch.Tensor, int]:
    """Backward of one accumulation window, normalised by its total loss tokens N: each micro-batch
    contributes ``loss_sum / N``, so the summed gradient is that of the mean loss over all N tokens,
    the same as one batch holding all of them. Returns (mean loss, a 0-d tensor left on the
    device, and N, counted on the CPU batches).

    Under torchrun (``parallel``) the window is this rank's share of the step: N and the loss are
    summed over the ranks and the gradient comes out as that of the whole step
    (`engine.run.distributed`); with ``seed`` each micro-batch draws its dropout under its own seed.
    """
    parallel = parallel or Parallel.single(device)
    n_tokens, = parallel.sum_ints([sum(count_loss_tokens(b) for b in window)])  # before any backward
    total = torch.zeros((), dtype=torch.float32, device=device)
    for batch in parallel.micro_batches(window, seed):
        part = loss_sum(model, batch.to(device))
        parallel.backward(part / max(n_tokens, 1))
        total += part.detach()
    return parallel.sum_(total) / max(n_tokens, 1), n_tokens


def train_step(run: Run, window: list[Batch]) -> StepResult:
    """One optimizer step of SFT over the micro-batches of one accumulation window."""
    loss, n_tokens = backward_window(run.model, window, run.device, run.parallel, seed=run.cfg.seed)
    update = run.optimizer.step(loss, run.step)
    real_tokens, = run.parallel.sum_ints([sum(b.real_tokens for b in window)])
    return StepResult(loss, update, tokens=n_tokens, real_tokens=real_tokens,
                      samples=[run.data.train[i].source for b in window for row in b.sample_ids for i in row])


def mixed_window(run: Run, loader: BatchLoader, window: list[Batch], replay: ReplayMix | None) -> list[Mixed]:
    """This rank's micro-batches of the step with their replay samples appended (host work, before
    the step): assigned over every rank's micro-batches of the step, then this rank's share."""
    if replay is None:
        return [Mixed.plain(b) for b in window]
    groups = [[i for row in loader.groups(epoch)[index] for i in row] for epoch, index in run.step_positions]
    mine = run.parallel.window(replay.assign(groups))
    return [replay.batch(loader, b, ids) for b, ids in zip(window, mine)]


def mitigated_step(run: Run, mixed: list[Mixed], samples: list[str]) -> StepResult:
    """One optimizer step of SFT with replay samples mixed in (`mixed_window`) and / or the KL
    anchor (module docstring): the gradient of (train + replay + β · kl) / N over the whole window."""
    beta, parallel = run.cfg.kl_to_base, run.parallel
    n_tokens, n_replay, n_replay_samples, real_tokens = parallel.sum_ints(
        [sum(count_loss_tokens(m.batch) for m in mixed), sum(m.replay_tokens for m in mixed),
         sum(m.replay_samples for m in mixed), sum(m.batch.real_tokens for m in mixed)])  # before any backward
    sums = torch.zeros(3, dtype=torch.float32, device=run.device)  # train, replay, kl
    for m, _ in zip(mixed, parallel.micro_batches([m.batch for m in mixed], run.cfg.seed)):  # seed, DDP sync
        part = anchored_sums(run.model, m.on(run.device), beta)
        parallel.backward(part.objective(beta) / max(n_tokens, 1))
        sums += torch.stack([part.train, part.replay, part.kl]).detach()
    train, replayed, kl = parallel.sum_(sums)
    objective = (train + replayed + beta * kl) / max(n_tokens, 1)
    update = run.optimizer.step(objective, run.step)
    metrics = {"objective": objective}
    if run.cfg.replay_data:
        metrics.update({"replay/loss": replayed / max(n_replay, 1), "replay/tokens": n_replay,
                        "replay/samples": n_replay_samples})
    if beta:
        metrics["kl_to_base"] = kl / max(n_tokens, 1)
    return StepResult(train / max(n_tokens - n_replay, 1), update, tokens=n_tokens, real_tokens=real_tokens,
                      samples=samples, metrics=metrics)


def summarize(result: dict[str, Any]) -> str:
    return f"eval loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}"


def train(cfg: TrainConfig, progress: bool = True) -> Run:
    """Fine-tune ``cfg.model`` on ``cfg.data``; returns the finished run (``run.final_eval``...)."""
    with Run.open(cfg, METHOD, progress) as run:
        run.data = load_sft_data(cfg.data, run.tokenizer, format=None if cfg.format == "auto" else cfg.format,
                                 max_len=run.max_len, length_policy=cfg.length_policy,
                                 train_on_prompt=cfg.train_on_prompt, eval_path=cfg.eval_data,
                                 eval_split=cfg.eval_split, seed=cfg.seed, skip_invalid=cfg.skip_invalid_records)
        pad_id = run.tokenizer.pad_token_id
        loader = BatchLoader(run.data.train, cfg.batch_size, pad_id=pad_id, seed=cfg.seed, batching=cfg.batching,
                             max_len=run.max_len, max_tokens=cfg.max_tokens_per_batch)
        eval_batching = "padded" if cfg.batching == "padded" else "padding-free"  # eval: batch_size samples
        replay = ReplayMix.load(cfg, run.tokenizer, run.max_len, run.model_config.vocab_size)
        run.plan(loader.num_batches(0))
        run.build_model()
        run.loss_label = "cross-entropy (nats / token)"

        def evaluate() -> dict[str, Any]:
            return mean_loss(run.model, run.data.eval, batch_size=cfg.batch_size, pad_id=pad_id,
                             device=run.device, progress=False, batching=eval_batching,
                             parallel=run.parallel).to_json()

        resumed = run.start([run.data.train_report, run.data.eval_report, sft_batching_report(loader),
                             replay.report if replay else None],
                            evaluate if run.data.eval else None, summarize)
        if replay is not None and resumed is not None:
            replay.restore(load_extra(resumed, REPLAY))
        for window in run.windows(loader):
            if replay is None and not cfg.kl_to_base:
                result = train_step(run, window)
            else:
                mixed = mixed_window(run, loader, window, replay)
                samples = [replay.source_of(loader, i) if replay else run.data.train[i].source
                           for m in mixed for row in m.batch.sample_ids for i in row]
                result = mitigated_step(run, mixed, samples)
                if replay is not None:
                    run.extras[REPLAY] = replay.state()  # the replay position after this step
            run.end_step(result)
        run.finish()
        return run
