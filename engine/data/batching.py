"""Deterministic, resumable batches of SFT samples, padded or packed.

The order of an epoch is a pure function of (seed, epoch): `epoch_order` draws a permutation from
a `torch.Generator` seeded with both, so a run resumed at (epoch, batch index) sees exactly the
batches an uninterrupted run would have seen from there (`BatchLoader.batches(epoch, start)`).

Padded batches (``pack=False``): samples in epoch order, ``batch_size`` per batch, padded on the
right with ``pad_id`` to the longest sample (rounded up to ``pad_to_multiple_of``);
attention_mask 0 and labels -100 on padding; position ids as the model's default,
``cumsum(mask) - 1`` clamped at 0; no segment ids. The last batch may be smaller.

Packed batches (``pack=True``): rows of exactly ``max_len`` tokens (see `engine.data.packing`), built
from the documents in epoch order, ``batch_size`` rows per batch, with segment ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.data.packing import pack_row, plan_rows
from engine.data.render import IGNORE
from engine.data.samples import Sample

_SEED_STRIDE = 1_000_003  # a prime, so (seed, epoch) pairs map to distinct generator seeds


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation of range(n), fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed((seed * _SEED_STRIDE + epoch) % (2**63))
    return torch.randperm(n, generator=generator).tolist()


@dataclass
class Batch:
    """Tensors of shape (B, T), int64, and where they came from."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor | None  # only for packed batches
    sample_ids: list[list[int]]       # indices into the sample list, per row
    epoch: int
    index: int                        # batch index within the epoch

    def to(self, device: str | torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask),
                     move(self.position_ids), move(self.segment_ids), self.sample_ids, self.epoch, self.index)


def collate_padded(samples: list[Sample], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Right-pad samples into (B, T) tensors; T = longest, rounded up to `pad_to_multiple_of`."""
    longest = max(len(s.input_ids) for s in samples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, :n] = torch.tensor(sample.labels)
        mask[row, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions,
            "segment_ids": None}


class BatchLoader:
    """Batches of one epoch at a time; ``batches(epoch, start)`` resumes mid-epoch exactly."""

    def __init__(self, samples: list[Sample], batch_size: int, *, pad_id: int, seed: int = 0,
                 shuffle: bool = True, pack: bool = False, max_len: int | None = None,
                 pad_to_multiple_of: int = 1):
        if not samples:
            raise ValueError("BatchLoader needs at least one sample")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected >= 1")
        if pack and max_len is None:
            raise ValueError("pack=True needs max_len, the length of a packed row")
        self.samples, self.batch_size, self.pad_id, self.seed = samples, batch_size, pad_id, seed
        self.shuffle, self.pack, self.max_len = shuffle, pack, max_len
        self.pad_to_multiple_of = pad_to_multiple_of

    def _rows(self, epoch: int) -> list[list[int]]:
        """Sample indices of each row of the epoch, in order."""
        n = len(self.samples)
        order = epoch_order(n, self.seed, epoch) if self.shuffle else list(range(n))
        if not self.pack:
            return [[i] for i in order]
        return plan_rows([len(s.input_ids) for s in self.samples], order, self.max_len)

    def num_batches(self, epoch: int) -> int:
        return -(-len(self._rows(epoch)) // self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` from batch index `start` on."""
        rows = self._rows(epoch)
        for index in range(start, -(-len(rows) // self.batch_size)):
            chunk = rows[index * self.batch_size:(index + 1) * self.batch_size]
            yield self._collate(chunk, epoch, index)

    def _collate(self, chunk: list[list[int]], epoch: int, index: int) -> Batch:
        if self.pack:
            packed = [pack_row([(self.samples[i].input_ids, self.samples[i].labels) for i in row],
                               self.max_len, self.pad_id) for row in chunk]
            tensors = {k: torch.stack([p[k] for p in packed]) for k in packed[0]}
        else:
            tensors = collate_padded([self.samples[row[0]] for row in chunk], self.pad_id,
                                     self.pad_to_multiple_of)
        return Batch(**tensors, sample_ids=chunk, epoch=epoch, index=index)
