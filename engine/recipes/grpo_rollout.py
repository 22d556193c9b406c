"""GRPO's rollouts: a micro-batch of prompts, G sampled completions each, scored and ready for the loss.

`Rollouts.make(prompts)`, for the b prompts of one micro-batch, top to bottom:

1. sample: each prompt repeated G times, N = b·G completions decoded together with the KV cache
   (`engine.sampling.sample_completions`, eval mode), under a generator seeded by the micro-batch's
   place in the data order (``sampling_generator(seed, epoch, part=index)``): a resumed run, or
   one on another number of ranks, samples the same completions;
2. score: the completion texts (special tokens dropped; ``[{"role": "assistant", "content": t}]``
   for chat prompts, TRL's convention) through the reward functions, with the record's other
   fields as columns (`engine.rewards`);
3. the training batch: N documents ``prompt + completion`` (labels on the completion only) in the
   run's layout (one padding-free row, or padded rows), and for each completion token the flat
   index of the position that predicts it: ``positions`` (N, T_c) with ``mask`` (N, T_c);
4. with β > 0, π_ref's per-token log-probs (adapters off, or the frozen starting adapter:
   `engine.recipes.dpo_reference.ReferencePolicy`), and π_old's when the loss needs them before
   the step (``--num-iterations`` > 1, or RLOO's KL in the reward), both without a graph, in eval
   mode;
5. the advantages within each group (`engine.losses.policy.group_advantages`; for RLOO the reward
   is r − β·Σ_t (log π_old − log π_ref) first).

Log-probs are those of the sampling distribution: logits / T, computed as (h / T)·Wᵀ through the
fused head (no (N, V) logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.data.batching import Batch, collate_padded, collate_padding_free, with_host_facts
from engine.data.prompts import PromptBatch, PromptSample
from engine.data.render import IGNORE
from engine.data.samples import Sample
from engine.losses.causal_lm import hidden_states, shifted_labels
from engine.losses.policy import group_advantages, sequence_kl_penalty
from engine.recipes.dpo_reference import ReferencePolicy
from engine.rewards import RewardScores, RewardSet
from engine.sampling import sample_completions, sampling_generator
from kernels.linear_cross_entropy import linear_logprobs


@dataclass
class SamplingOptions:
    """How completions are drawn and what the loss needs of them."""

    num_generations: int
    max_completion_len: int
    temperature: float
    top_p: float
    beta: float
    loss: str
    needs_old_logps: bool  # --num-iterations > 1: π_old is the policy at sampling time
    batching: str          # "padding-free" or "padded": the training forward's layout


@dataclass
class Rollout:
    """One micro-batch's N = b·G completions and what the loss needs of them (rows in group order:
    the completions of prompt p are rows p·G … p·G + G − 1)."""

    prompts: PromptBatch
    completions: list[list[int]]     # token ids, EOS included when one was sampled
    texts: list[str]
    scores: RewardScores             # total (N,) and per function
    batch: Batch                     # the N documents prompt + completion
    positions: torch.Tensor          # (N, T_c) flat index of each completion token's predicting position
    mask: torch.Tensor               # (N, T_c) bool: a real completion token
    advantages: torch.Tensor         # (N,) fp32
    old_logps: torch.Tensor | None   # (N, T_c) π_old, when the loss needs it before the step
    ref_logps: torch.Tensor | None   # (N, T_c) π_ref, with β > 0

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completions]


def completion_batch(prompts: list[list[int]], completions: list[list[int]], sources: list[str], pad_id: int,
                     batching: str) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """(batch of the documents prompt_i + completion_i, positions (N, T_c), mask (N, T_c)).

    Hidden state t predicts token t + 1, so completion token j of document i (at row offset
    o_i + p_i + j, p_i its prompt's length) is predicted from position o_i + p_i + j − 1 of its row;
    in the flattened (rows · (width − 1)) predicted positions that is
    ``row_i · (width − 1) + o_i + p_i + j − 1``. Masked slots point at position 0 (weight 0).
    """
    samples = [Sample(p + c, [IGNORE] * len(p) + c, source) for p, c, source in zip(prompts, completions, sources)]
    if batching == "padded":
        tensors = collate_padded(samples, pad_id)
        rows, offsets = list(range(len(samples))), [0] * len(samples)
        sample_ids = [[i] for i in range(len(samples))]
    else:
        tensors = collate_padding_free(samples, pad_id)
        rows = [0] * len(samples)
        lengths = [len(s.input_ids) for s in samples]
        offsets = [sum(lengths[:i]) for i in range(len(samples))]
        sample_ids = [list(range(len(samples)))]
    batch = with_host_facts(Batch(**tensors, sample_ids=sample_ids, epoch=0, index=0))
    width = batch.input_ids.shape[1]
    longest = max(len(c) for c in completions)
    positions = torch.zeros(len(samples), longest, dtype=torch.long)
    mask = torch.zeros(len(samples), longest, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        start = rows[i] * (width - 1) + offsets[i] + len(p) - 1
        positions[i, :len(c)] = torch.arange(start, start + len(c))
        mask[i, :len(c)] = True
    return batch, positions, mask


def token_logps(model: torch.nn.Module, batch: Batch, positions: torch.Tensor, mask: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """log π(y_t | x, y_<t) of every completion token at temperature T, (N, T_c) fp32, 0 where masked;
    differentiable when grad is on."""
    hidden = hidden_states(model, batch)  # first: under FSDP2 the head weight is whole after the forward
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (rows·(width−1), H)
    if temperature != 1.0:
        flat = flat / temperature  # (h / T)·Wᵀ = logits / T
    labels = shifted_labels(batch).reshape(-1)
    per_position = linear_logprobs(flat, model.lm_head.weight, labels, IGNORE, labels_checked=True)
    return per_position[positions] * mask


def completion_messages(sample: PromptSample, text: str):
    """What a reward function gets as the completion: the text, or an assistant message for a chat prompt."""
    return [{"role": "assistant", "content": text}] if sample.conversational else text


def score_completions(rewards: RewardSet, tokenizer, samples: list[PromptSample],
                      completions: list[list[int]]) -> tuple[list[str], RewardScores]:
    """The completions' texts (special tokens dropped) and their rewards; ``samples[i]`` is
    completion i's prompt, whose record's other fields are the columns (None where one lacks one)."""
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    names = sorted({name for s in samples for name in s.columns})
    columns = {name: [s.columns.get(name) for s in samples] for name in names}
    scores = rewards.score([s.prompt for s in samples], [completion_messages(s, t) for s, t in zip(samples, texts)],
                           columns, [s.source for s in samples])
    return texts, scores


class Rollouts:
    """Makes `Rollout`s with the training model (and its reference policy) for one run."""

    def __init__(self, model: torch.nn.Module, tokenizer, reference: ReferencePolicy, rewards: RewardSet,
                 options: SamplingOptions, seed: int, eos_ids: set[int], device: torch.device, all_finished=None):
        self.model, self.tokenizer, self.reference, self.rewards = model, tokenizer, reference, rewards
        self.options, self.seed, self.eos_ids, self.device = options, seed, eos_ids, device
        self.pad_id = tokenizer.pad_token_id
        self.all_finished = all_finished

    def sample(self, prompts: list[list[int]], temperature: float, generator: torch.Generator | None) -> list[list[int]]:
        return sample_completions(self.model, prompts, max_new_tokens=self.options.max_completion_len,
                                  temperature=temperature, top_p=self.options.top_p, eos_token_ids=self.eos_ids,
                                  generator=generator, pad_id=self.pad_id, all_finished=self.all_finished)

    def score(self, samples: list[PromptSample], completions: list[list[int]]) -> tuple[list[str], RewardScores]:
        """`score_completions` with the run's reward functions and tokenizer."""
        return score_completions(self.rewards, self.tokenizer, samples, completions)

    def make(self, prompts: PromptBatch) -> Rollout:
        """Sample, score and prepare one micro-batch (see the module docstring)."""
        o = self.options
        samples = [s for s in prompts.samples for _ in range(o.num_generations)]  # (N,) group order
        prompt_ids = [s.prompt_ids for s in samples]
        generator = sampling_generator(self.seed, prompts.epoch, self.device, part=prompts.index)
        completions = self.sample(prompt_ids, o.temperature, generator)
        texts, scores = self.score(samples, completions)
        batch, positions, mask = self.training_batch(samples, completions)
        ref_logps = self._logps(batch, positions, mask, reference=True) if o.beta > 0 else None
        rloo_kl = o.loss == "rloo" and o.beta > 0
        old_logps = self._logps(batch, positions, mask, reference=False) if o.needs_old_logps or rloo_kl else None
        rewards = scores.total.to(self.device)
        if rloo_kl:  # RLOO: the KL to the reference is a penalty on the reward, before the baseline
            rewards = rewards - o.beta * sequence_kl_penalty(old_logps, ref_logps, mask)
        advantages = group_advantages(rewards, o.num_generations, o.loss)
        return Rollout(prompts, completions, texts, scores, batch, positions, mask, advantages,
                       old_logps if o.needs_old_logps else None, ref_logps)

    def training_batch(self, samples: list[PromptSample], completions: list[list[int]]):
        """(batch, positions, mask) of the documents prompt + completion, on the device."""
        batch, positions, mask = completion_batch([s.prompt_ids for s in samples], completions,
                                                  [s.source for s in samples], self.pad_id, self.options.batching)
        return batch.to(self.device), positions.to(self.device), mask.to(self.device)

    def restore(self, prompts: PromptBatch, completions: list[list[int]], scores: RewardScores,
                advantages: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None) -> Rollout:
        """A rollout made before a checkpoint, from what the checkpoint kept (`engine.recipes.grpo_state`)."""
        samples = [s for s in prompts.samples for _ in range(self.options.num_generations)]
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        batch, positions, mask = self.training_batch(samples, completions)
        move = lambda t: None if t is None else t.to(self.device)
        return Rollout(prompts, completions, texts, scores, batch, positions, mask, advantages.to(self.device),
                       move(old_logps), move(ref_logps))

    @torch.no_grad()
    def _logps(self, batch: Batch, positions: torch.Tensor, mask: torch.Tensor, reference: bool) -> torch.Tensor:
        """π_ref's (adapters off / frozen start) or the current policy's token log-probs, eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            if reference:
                with self.reference.active():
                    return token_logps(self.model, batch, positions, mask, self.options.temperature)
            return token_logps(self.model, batch, positions, mask, self.options.temperature)
        finally:
            self.model.train(was_training)
