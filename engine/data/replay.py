"""Replay (``--replay-data F --replay-ratio ρ``): general samples mixed into the SFT batches.

Of all the samples a run trains on, the fraction ρ comes from the replay set. After the run has
taken n training samples it has mixed in exactly

    q(n) = ⌊n · ρ / (1 − ρ)⌋        replay samples (ρ as the exact decimal given: 0.1 is 1/10),

so a step that takes the training samples n₀ + 1 … n₁ adds the replay samples q(n₀) … q(n₁) − 1
of the replay order: the fraction holds over the run to within one sample, however the steps are
sized (with ρ = 0.1 and 8 samples per step, most steps carry one replay sample, every ninth
none). The replay order is a permutation of the replay set per pass over it (`epoch_order`, from
the seed), passes following each other as the run needs; it is a function of n alone, and n is
saved in checkpoints (`state` / `restore`), so a resumed run mixes in the same samples.

Replay sample j of a step goes into the step's micro-batch j mod M (M = the step's micro-batches
over every rank), appended after its training samples: the number of micro-batches, hence the
DDP / FSDP2 collectives, is unchanged, and the split over ranks does not change what is mixed in.
A mixed micro-batch is laid out as its training samples are (`Mixed.batch`: padding-free, one row;
padded, one row each), and `Mixed.replay_labels` marks the next-token labels that belong to replay
samples, so their loss is reported apart (``replay/loss``) while the gradient counts every token.
Replay samples come on top of a batch's training samples: with ``--max-tokens-per-batch`` a mixed
batch can exceed the budget by its replay samples' tokens (about ρ / (1 − ρ) of a batch's samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from engine.data.batching import Batch, BatchLoader, collate_padded, collate_padding_free, epoch_order, with_host_facts
from engine.data.render import IGNORE
from engine.data.samples import DataReport, Sample, check_vocabulary, load_samples
from engine.errors import InputError

_REPLAY_SEED_OFFSET = 0x5EED  # the replay order differs from the training order of the same seed


@dataclass
class Mixed:
    """One micro-batch with replay samples appended: the batch and, (B, T-1) bool on the host,
    which of its next-token labels are a replay sample's."""

    batch: Batch
    replay_labels: torch.Tensor
    replay_samples: int
    replay_tokens: int  # the replay samples' trainable next-token labels, counted on the host

    @classmethod
    def plain(cls, batch: Batch) -> Mixed:
        """A batch with no replay sample."""
        return cls(batch, torch.zeros(batch.labels[:, 1:].shape, dtype=torch.bool), 0, 0)

    def on(self, device: torch.device) -> Mixed:
        """The batch on ``device`` (the replay labels stay on the host until the loss moves them)."""
        return Mixed(self.batch.to(device), self.replay_labels, self.replay_samples, self.replay_tokens)


class ReplayMix:
    """The replay samples and how many of them the run has mixed in so far."""

    def __init__(self, samples: list[Sample], ratio: float, seed: int, report: DataReport):
        if not samples:
            raise InputError(f"--replay-data {report.file}: no usable sample")
        self.samples, self.report = samples, report
        fraction = Fraction(str(ratio))
        self.per_sample = fraction / (1 - fraction)  # replay samples per training sample
        self.seed = seed + _REPLAY_SEED_OFFSET
        self.trained = 0  # n: training samples taken so far
        self._order: tuple[int, list[int]] = (-1, [])  # (pass, its order)

    @classmethod
    def load(cls, cfg: Any, tokenizer: Any, max_len: int, vocab_size: int) -> ReplayMix | None:
        """The ``--replay-data`` samples (any SFT format, the length policy of --data), or None."""
        if not cfg.replay_data:
            return None
        samples, report = load_samples(cfg.replay_data, tokenizer, max_len=max_len, length_policy=cfg.length_policy,
                                  train_on_prompt=cfg.train_on_prompt, skip_invalid=cfg.skip_invalid_records)
        check_vocabulary(samples, vocab_size, "--replay-data", cfg.replay_data)
        return cls(samples, cfg.replay_ratio, cfg.seed, report)

    def quota(self, n: int) -> int:
        """q(n): replay samples mixed in once n training samples were taken."""
        return math.floor(n * self.per_sample)

    def _replay_index(self, k: int) -> int:
        epoch, position = divmod(k, len(self.samples))
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.samples), self.seed, epoch))
        return self._order[1][position]

    def assign(self, step_groups: list[list[int]]) -> list[list[int]]:
        """For the training sample ids of each of a step's micro-batches (every rank's, in order),
        the replay sample ids appended to each; advances the count."""
        n = sum(len(group) for group in step_groups)
        first, last = self.quota(self.trained), self.quota(self.trained + n)
        self.trained += n
        assigned: list[list[int]] = [[] for _ in step_groups]
        for j, k in enumerate(range(first, last)):
            assigned[j % len(step_groups)].append(self._replay_index(k))
        return assigned

    def batch(self, loader: BatchLoader, batch: Batch, replay_ids: list[int]) -> Mixed:
        """``batch`` (of ``loader``) with the replay samples ``replay_ids`` appended (or alone, with
        no replay label, when there are none). Replay samples get ids ``len(loader.samples) + i``."""
        if not replay_ids:
            return Mixed.plain(batch)
        train = [i for row in batch.sample_ids for i in row]
        samples = [loader.samples[i] for i in train] + [self.samples[i] for i in replay_ids]
        offset = len(loader.samples)
        replay_ids = [offset + i for i in replay_ids]
        if loader.batching == "padding-free":
            tensors = collate_padding_free(samples, loader.pad_id, loader.pad_to_multiple_of)
            start = sum(len(s.input_ids) for s in samples[:len(train)])  # the first replay token
            replay = torch.zeros(tensors["labels"][:, 1:].shape, dtype=torch.bool)
            replay[:, start - 1:] = True  # label t predicts token t + 1
            sample_ids = [train + replay_ids]
        else:  # padded: one row per sample
            tensors = collate_padded(samples, loader.pad_id, loader.pad_to_multiple_of)
            replay = torch.zeros(tensors["labels"][:, 1:].shape, dtype=torch.bool)
            replay[len(train):] = True
            sample_ids = [[i] for i in train + replay_ids]
        mixed = with_host_facts(Batch(**tensors, sample_ids=sample_ids, epoch=batch.epoch, index=batch.index))
        tokens = int((replay & (mixed.next_token_labels() != IGNORE)).sum())
        return Mixed(mixed, replay, len(replay_ids), tokens)

    def source_of(self, loader: BatchLoader, sample_id: int) -> str:
        """"file:line" of a training sample id or of a replay sample id as `batch` numbers them."""
        n = len(loader.samples)
        return loader.samples[sample_id].source if sample_id < n else self.samples[sample_id - n].source

    def state(self) -> dict[str, torch.Tensor]:
        return {"trained": torch.tensor([self.trained])}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        self.trained = int(saved["trained"])
