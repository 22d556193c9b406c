"""Online policy optimisation from rewards (GRPO, Dr. GRPO, RLOO) with LoRA or QLoRA: ``train(cfg)``.

One optimizer step (`train_step`), top to bottom:

1. the window: ``grad_accum`` micro-batches of ``--batch-size`` prompts (`engine.data.prompts`),
   N = (prompts of the whole step) · G completions counted before anything runs;
2. per micro-batch: its rollout (`engine.recipes.grpo_rollout`: G completions per prompt sampled
   with the KV cache, rewards, advantages within each group, π_ref's token log-probs with β > 0),
   made at the first step of every ``--num-iterations`` and kept for the others; then the policy's
   token log-probs log π(y_t) at the sampling temperature, with a graph, and

       L = −min(ρ_t·A, clip(ρ_t, 1 − ε, 1 + ε)·A) + β·k3_t,    ρ_t = π(y_t) / π_old(y_t)

   aggregated over the step as the loss type says (`engine.losses.policy.policy_loss`: grpo and
   rloo average each completion's tokens then the N completions; dr_grpo sums the tokens over
   N · --max-completion-len; RLOO has its KL in the reward instead). With one iteration π_old is
   the policy itself (ρ = 1, the gradient is the policy gradient −A·∇log π);
3. `engine.run.optimizer.Optimizer.step`: guard, clip, schedule, AdamW;
4. `engine.run.session.Run.end_step`: log, evaluate, checkpoint.

Metrics (TRL's names): ``reward``, ``reward_std`` (mean within-group std), ``rewards/<f>/mean``
and ``/std`` per reward function, ``frac_reward_zero_std``, ``kl`` (token mean of k3 to π_ref,
with β > 0), ``clip_ratio`` (= ``clip_ratio/region_mean``), ``clip_ratio/low_mean``,
``clip_ratio/high_mean``, ``completions/mean_length``, ``/min_length``, ``/max_length``,
``/clipped_ratio`` (no EOS within --max-completion-len). Eval lines: the same reward figures of
one greedy completion per held-out prompt, prefixed ``eval/``. Every sampled completion, with its
rewards, goes to ``OUTPUT/completions.jsonl``; ``OUTPUT/reward.png`` draws the reward curve.

Resume is exact: sampling draws from a generator seeded by each micro-batch's place in the data
order, and the rollouts kept between the iterations of one batch are saved in checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from engine.config import TrainConfig
from engine.data.prompts import PromptLoader, PromptSample, StepRepeats, load_prompt_data
from engine.errors import InputError
from engine.losses.policy import PolicySums, policy_loss
from engine.recipes.dpo_reference import ReferencePolicy
from engine.recipes.grpo_rollout import Rollout, Rollouts, SamplingOptions, token_logps
from engine.recipes.grpo_state import restore_rollouts, saved_rollouts
from engine.rewards import RewardError, load_reward_functions, metrics_from_sums, reward_sums
from engine.rewards.scoring import RESERVED_COLUMNS
from engine.run.checkpoint import load_extra
from engine.run.distributed import Parallel, evaluation_share
from engine.run.metrics import Curve, MetricsLog
from engine.run.session import Run, StepResult

METHOD = "grpo"
ROLLOUTS_EXTRA = "grpo_rollouts"  # checkpoint file of the rollouts kept between iterations


@dataclass
class GRPOOptions:
    """GRPO's own settings, read from TrainConfig by `from_config`."""

    num_generations: int = 8
    max_completion_len: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    loss: str = "grpo"
    epsilon: float = 0.2
    beta: float = 0.04
    num_iterations: int = 1

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> GRPOOptions:
        return cls(num_generations=cfg.num_generations, max_completion_len=cfg.max_completion_len,
                   temperature=cfg.temperature, top_p=cfg.top_p, loss=cfg.grpo_loss, epsilon=cfg.epsilon,
                   beta=cfg.beta, num_iterations=cfg.num_iterations)

    def sampling(self, batching: str) -> SamplingOptions:
        return SamplingOptions(self.num_generations, self.max_completion_len, self.temperature, self.top_p,
                               self.beta, self.loss, needs_old_logps=self.num_iterations > 1, batching=batching)

    def loss_label(self) -> str:
        kl = f", β = {self.beta:g}" if self.beta else ""
        return f"{self.loss} policy loss (ε = {self.epsilon:g}{kl})"


def check_config(cfg: TrainConfig, max_len: int) -> int:
    """The most prompt tokens a sample may keep (--max-len less --max-completion-len); InputError for
    settings GRPO cannot run with."""
    if cfg.batching == "pack":
        raise InputError("--method grpo: --pack / --batching pack packs fixed documents; GRPO's completions "
                         "are sampled each step: use --batching padding-free (default) or padded")
    if cfg.max_tokens_per_batch is not None:
        raise InputError("--method grpo: --max-tokens-per-batch is not supported; --batch-size counts prompts "
                         "(each with --num-generations completions)")
    room = max_len - cfg.max_completion_len
    if room < 2:
        raise InputError(f"--max-len {max_len} leaves {room} tokens for the prompt with --max-completion-len "
                         f"{cfg.max_completion_len}: raise --max-len or lower --max-completion-len")
    return room


def check_columns(data, required: set[str]) -> None:
    """Every record has the columns the reward functions read (``answer`` for exact / number), and
    none is named as their two positional arguments (``prompts``, ``completions``)."""
    for sample in data.train + data.eval:
        if clash := sorted(RESERVED_COLUMNS & set(sample.columns)):
            raise InputError(f"{sample.source}: the field {clash[0]!r} has the name of a reward function's argument "
                             "(f(prompts, completions, **columns)); rename it")
    for column in sorted(required):
        missing = data.records_missing(column)
        if missing:
            raise InputError(f"{missing[0]}: the record has no {column!r} field, which the reward functions "
                             f"read ({len(missing)} record(s) lack it)")


# ----------------------------------------------------------------------------- figures

def length_metrics(completions: list[list[int]], eos_ids: set[int], parallel: Parallel,
                   prefix: str = "") -> dict[str, float]:
    """completions/mean_length, min, max and clipped_ratio (no EOS sampled) over every rank (a
    collective: every rank calls it, one with no completions too)."""
    lengths = [len(c) for c in completions]
    n, total, clipped = parallel.sum_ints([len(lengths), sum(lengths), sum(c[-1] not in eos_ids for c in completions)])
    low = min(parallel.gather_ints(min(lengths, default=2**62)))
    high = max(parallel.gather_ints(max(lengths, default=0)))
    return {f"{prefix}completions/mean_length": total / n, f"{prefix}completions/min_length": low,
            f"{prefix}completions/max_length": high, f"{prefix}completions/clipped_ratio": clipped / n}


# ----------------------------------------------------------------------------- the step

class PolicyObjective:
    """The rollouts of the current batch of prompts (kept for --num-iterations steps) and the options."""

    def __init__(self, rollouts: Rollouts, options: GRPOOptions):
        self.rollouts, self.options = rollouts, options
        self.kept: dict[tuple[int, int], Rollout] = {}

    def rollout(self, prompts) -> Rollout:
        """The micro-batch's rollout: made at the first of its ``num_iterations`` steps (or before
        the run began, `prefetch`), then reused."""
        key = (prompts.epoch, prompts.index)
        if key not in self.kept:
            self.kept[key] = self.rollouts.make(prompts)
        return self.kept[key]

    def new_cycle(self, step: int, window: list) -> None:
        """At the first step of a batch of prompts, forget the rollouts of the previous one."""
        if step % self.options.num_iterations == 0:
            current = {(p.epoch, p.index) for p in window}
            self.kept = {key: r for key, r in self.kept.items() if key in current}

    def prefetch(self, prompts) -> None:
        """Make the first step's first rollout now, before the run writes anything: a reward function
        that fails on the first completions stops the run with nothing written."""
        self.rollout(prompts)


def train_step(run: Run, obj: PolicyObjective, window: list, completions_log) -> StepResult:
    """One optimizer step of GRPO over this rank's micro-batches of prompts."""
    o, parallel = obj.options, run.parallel
    obj.new_cycle(run.step, window)
    n_sequences, = parallel.sum_ints([sum(len(b) for b in window) * o.num_generations])
    total = torch.zeros((), dtype=torch.float32, device=run.device)
    stats = None
    rollouts = []
    for prompts in parallel.micro_batches(window, run.cfg.seed):
        rollout = obj.rollout(prompts)
        logps = token_logps(run.model, rollout.batch, rollout.positions, rollout.mask, o.temperature)
        old = rollout.old_logps if rollout.old_logps is not None else logps.detach()
        loss, part = policy_loss(logps, old, rollout.ref_logps, rollout.advantages, rollout.mask, loss_type=o.loss,
                                 epsilon=o.epsilon, beta=o.beta, max_completion_len=o.max_completion_len,
                                 num_sequences=n_sequences)
        parallel.backward(loss)
        total += loss.detach()
        stats = part if stats is None else stats + part
        rollouts.append(rollout)
    parallel.sum_(total)
    update = run.optimizer.step(total, run.step)
    if o.num_iterations > 1:  # what a checkpoint taken before the next batch of prompts must keep
        run.extras[ROLLOUTS_EXTRA] = saved_rollouts(obj.kept)
    sums = parallel.sum_(reward_sums([r.scores for r in rollouts], o.num_generations).to(run.device))
    metrics: dict[str, Any] = metrics_from_sums(sums.tolist(), obj.rollouts.rewards.names)
    metrics |= length_metrics([c for r in rollouts for c in r.completions], obj.rollouts.eos_ids, parallel)
    policy = PolicySums.from_stacked(parallel.sum_(stats.stacked())).means()  # 0-d tensors, read with the log
    metrics |= policy | {"clip_ratio": policy["clip_ratio/region_mean"]}
    completions_log(run.step + 1, rollouts)
    tokens = sum(sum(r.lengths) for r in rollouts)
    real_tokens = sum(r.batch.real_tokens for r in rollouts)
    tokens, real_tokens = parallel.sum_ints([tokens, real_tokens])
    samples = [s.source for r in rollouts for s in r.prompts.samples]
    return StepResult(total, update, tokens=tokens, real_tokens=real_tokens, samples=samples, metrics=metrics)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(rollouts: Rollouts, samples: list[PromptSample], batch_size: int, parallel: Parallel) -> dict[str, Any]:
    """One greedy completion per held-out prompt, scored: the reward metrics prefixed ``eval/``.
    Under torchrun the ranks share the batches (`evaluation_share`)."""
    loader = PromptLoader(samples, batch_size, shuffle=False)
    scores, completions = [], []
    for index, counted in evaluation_share(parallel, loader.num_batches(0)):
        prompts = loader.batch(0, index)
        sampled = rollouts.sample(prompts.prompt_ids, temperature=0.0, generator=None)
        _, score = rollouts.score(prompts.samples, sampled)
        if counted:
            scores.append(score)
            completions.extend(sampled)
    names = list(rollouts.rewards.names)
    if scores:
        sums = reward_sums(scores, 1)
    else:  # a rank with nothing counted still joins the sum
        sums = torch.zeros(6 + 2 * len(names), dtype=torch.float64)
    figures = parallel.sum_(sums.to(parallel.device)).tolist()
    result = {k: v for k, v in metrics_from_sums(figures, names, prefix="eval/").items()
              if not k.endswith(("reward_std", "zero_std"))}  # one completion per prompt: no groups
    result["prompts"] = int(figures[0])
    return result | length_metrics(completions, rollouts.eos_ids, parallel, prefix="eval/")


def summarize(result: dict[str, Any]) -> str:
    parts = ", ".join(f"{k.split('/')[2]} {v:.3f}" for k, v in result.items()
                      if k.startswith("eval/rewards/") and k.endswith("/mean"))
    length = result.get("eval/completions/mean_length")
    tail = f"; mean completion {length:.1f} tokens" if length is not None else ""
    return f"eval reward {result['eval/reward']:.4f} ({parts}) over {result['prompts']} prompts, greedy{tail}"


# ----------------------------------------------------------------------------- the run

class CompletionsLog:
    """``OUTPUT/completions.jsonl``: every sampled completion of this rank with its rewards (rank 0's
    share under torchrun), cut back on resume like metrics.jsonl."""

    def __init__(self, run: Run, resumed: bool):
        self.log = MetricsLog(run.output / "completions.jsonl", resume_step=run.step if resumed else None) \
            if run.parallel.is_main else None

    def __call__(self, step: int, rollouts: list[Rollout]) -> None:
        if self.log is None:
            return
        for rollout in rollouts:
            n = len(rollout.completions)
            G = n // len(rollout.prompts)
            for i in range(n):
                sample = rollout.prompts.samples[i // G]
                self.log.write("completion", step, prompt=sample.source, group_index=i % G,
                               completion=rollout.texts[i], tokens=len(rollout.completions[i]),
                               reward=float(rollout.scores.total[i]), advantage=float(rollout.advantages[i]),
                               **{f"rewards/{k}": float(v[i]) for k, v in rollout.scores.per_function.items()})


def train(cfg: TrainConfig, progress: bool = True, options: GRPOOptions | None = None) -> Run:
    """Train ``cfg.model`` by GRPO on the prompts of ``cfg.data``; returns the finished run."""
    options = options or GRPOOptions.from_config(cfg)
    with Run.open(cfg, METHOD, progress) as run:
        max_prompt_len = check_config(cfg, run.max_len)
        rewards = load_reward_functions(cfg.reward or [], cfg.reward_weights, cfg.reward_model,
                                        reward_model_loader=lambda path: _reward_model(path, run))
        run.data = load_prompt_data(cfg.data, run.tokenizer, max_prompt_len=max_prompt_len,
                                    length_policy=cfg.length_policy, eval_path=cfg.eval_data,
                                    eval_split=cfg.eval_split, seed=cfg.seed, skip_invalid=cfg.skip_invalid_records)
        check_columns(run.data, rewards.required_columns())
        loader = PromptLoader(run.data.train, cfg.batch_size, seed=cfg.seed)
        if options.num_iterations > 1:  # each batch of prompts serves num_iterations consecutive steps
            loader = StepRepeats(loader, cfg.grad_accum * run.parallel.world, options.num_iterations)
        run.plan(loader.num_batches(0))
        model = run.build_model().model
        eos_ids = set(run.model_config.eos_token_ids) | set(run.tokenizer.eos_token_ids)
        agree = (lambda finished: not run.parallel.any(not bool(finished.all()))) if run.parallel.distributed \
            else None  # FSDP2: every rank runs the same decode steps
        rollouts = Rollouts(model, run.tokenizer, ReferencePolicy(model, frozen_initial=cfg.init_adapter is not None),
                            rewards, options.sampling(cfg.batching), cfg.seed, eos_ids, run.device, agree)
        obj = PolicyObjective(rollouts, options)
        run.lineage_extra["grpo"] = dict(asdict(options), rewards=rewards.names, reward_weights=rewards.weights,
                                         reference="initial adapter (frozen)" if cfg.init_adapter else "base model")
        run.loss_label = options.loss_label()
        run.curves.append(Curve("reward.png", "reward", "eval/reward", "reward (mean over completions)"))
        eval_batch = cfg.batch_size * options.num_generations  # greedy: one completion per prompt

        def evaluate_rewards() -> dict[str, Any]:
            return evaluate(rollouts, run.data.eval, eval_batch, run.parallel)

        if not cfg.resume:  # this rank's first micro-batch of step 1 (`engine.run.distributed.Parallel.window`)
            obj.prefetch(loader.batch(0, run.parallel.rank * cfg.grad_accum))
        resumed_from = run.start([run.data.train_report, run.data.eval_report],
                                 evaluate_rewards if run.data.eval else None, summarize)
        if resumed_from is not None and options.num_iterations > 1 and run.step % options.num_iterations:
            obj.kept = restore_rollouts(load_extra(resumed_from, ROLLOUTS_EXTRA), rollouts, loader)
        completions_log = CompletionsLog(run, resumed=resumed_from is not None)
        try:
            for window in run.windows(loader):
                run.end_step(train_step(run, obj, window, completions_log))
        except RewardError as err:  # a grader failed mid-run: keep what was trained, then stop (exit 2)
            if run.parallel.distributed or (run.applied_steps == 0 and resumed_from is None):
                raise  # under torchrun the other ranks stop at their collective's timeout
            path = run.save_checkpoint()
            raise RewardError(f"{err}; the run stopped at step {run.step} with a checkpoint in {path}: fix the "
                              "reward function and continue with --resume") from None
        run.finish()
        return run


def _reward_model(path: str, run: Run):
    """The scorer of a reward-model folder, on the run's device and dtype (NF4 with --quant nf4)."""
    from engine.reward_model import RewardModelScorer

    return RewardModelScorer.load(path, device=run.device, dtype=run.dtype, quant=run.cfg.quant)
