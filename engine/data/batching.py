"""Deterministic, resumable batches of SFT samples: padding-free, padded or packed.

The order of an epoch is a pure function of (seed, epoch): `epoch_order` draws a permutation from
a `torch.Generator` seeded with both, so a run resumed at (epoch, batch index) sees exactly the
batches an uninterrupted run would have seen from there (`BatchLoader.batches(epoch, start)`).
Which samples form a padded or padding-free batch (`batch_groups`) depends only on that order:

* ``batch_size`` consecutive samples of the epoch order per batch (the last may be smaller), or,
  with ``max_tokens`` (``--max-tokens-per-batch N``, padding-free only), as many consecutive
  samples as fit in N tokens; a sample longer than N is refused (`TokenBudgetError`, naming it),
  never split and never allowed to overrun the budget.

Layouts (``batching``, `BATCHINGS`):

* ``padding-free`` (the CLI's default): the batch is ONE row of its samples concatenated, shape
  (1, Σ len), each sample a document with its own segment id, positions restarting at 0 and no
  padding at all (`engine.data.packing.pack_row` with the row as long as its documents, rounded
  up to ``pad_to_multiple_of``). The model never lets attention cross a segment and
  `engine.losses.causal_lm.shifted_labels` never predicts across one, so every token gets the loss
  it gets in a padded batch of the same samples (up to float rounding) and the trainable-token
  count N, hence the per-token normalisation, is the same.
* ``padded``: samples right-padded with ``pad_id`` to the longest (rounded up to
  ``pad_to_multiple_of``) in (B, T); attention_mask 0 and labels -100 on padding; position ids
  ``cumsum(mask) - 1`` clamped at 0 (the model's default); no segment ids.
* ``pack`` (``--pack``): rows of exactly ``max_len`` tokens (`engine.data.packing`), built from the
  documents in epoch order, ``batch_size`` rows per batch, with segment ids.

``Batch.sample_ids[row]`` lists the samples of each row in row order; within a row, sample k of
that list is segment k. `documents` numbers every token by its document in the row-major order of
``sample_ids`` (what per-document reductions such as DPO's log-probs need).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.data.packing import pack_row, plan_rows
from engine.data.render import IGNORE
from engine.data.samples import Sample
from engine.errors import InputError
from models.attention import DocumentLayout

_SEED_STRIDE = 1_000_003  # a prime, so (seed, epoch) pairs map to distinct generator seeds
BATCHINGS = ("padding-free", "padded", "pack")


class TokenBudgetError(InputError):
    """A sample (or pair) longer than ``--max-tokens-per-batch``: it fits no batch (exit 2)."""


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation of range(n), fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed((seed * _SEED_STRIDE + epoch) % (2**63))
    return torch.randperm(n, generator=generator).tolist()


def batch_groups(order: list[int], lengths: list[int], batch_size: int,
                 max_tokens: int | None = None) -> list[list[int]]:
    """The items of each batch, consecutive in ``order``: ``batch_size`` per batch, or with
    ``max_tokens`` as many as fit in that many tokens (``lengths[i]`` tokens each)."""
    if max_tokens is None:
        return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    groups: list[list[int]] = []
    used = max_tokens + 1  # forces a new group for the first item
    for i in order:
        if lengths[i] > max_tokens:
            raise TokenBudgetError(f"item {i} has {lengths[i]} tokens, more than --max-tokens-per-batch {max_tokens}")
        if used + lengths[i] > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += lengths[i]
    return groups


@dataclass
class Batch:
    """Tensors of shape (B, T), int64, and where they came from; the loaders add what the training
    step needs to know about them from the host (`with_host_facts`), so that the step reads
    nothing back from the device: the documents for attention, the loss and real token counts."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor | None  # padding-free and packed batches
    sample_ids: list[list[int]]       # indices into the sample list, per row (segment k = k-th)
    epoch: int
    index: int                        # batch index within the epoch
    layout: DocumentLayout | None = None  # documents and padding runs, built on the host
    loss_tokens: int | None = None        # trainable next-token labels (`next_token_labels`)
    real_tokens: int | None = None        # non-padding tokens
    plain: bool = False                   # every row one unpadded document: plain causal attention
    document_tokens: list[int] | None = None  # trainable next-token labels per document (`documents`)

    def to(self, device: str | torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device)
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask),
                     move(self.position_ids), move(self.segment_ids), self.sample_ids, self.epoch, self.index,
                     move(self.layout), self.loss_tokens, self.real_tokens, self.plain, self.document_tokens)

    def next_token_labels(self) -> torch.Tensor:
        """labels[:, 1:] (hidden state t predicts token t + 1), with -100 where the next token
        starts another packed document."""
        labels = self.labels[:, 1:]
        if self.segment_ids is None:
            return labels.clone()
        # masked_fill, not boolean indexing: indexing by a mask is a device sync on a GPU
        return labels.masked_fill(self.segment_ids[:, 1:] != self.segment_ids[:, :-1], IGNORE)

    def label_documents(self) -> torch.Tensor:
        """(B, T-1): the document of each predicted token (of `next_token_labels`); padding (-1)
        mapped to document 0, where its ignored label adds nothing to a per-document sum."""
        return self.documents()[:, 1:].clamp(min=0)

    def attention_args(self) -> tuple[torch.Tensor | None, torch.Tensor | DocumentLayout | None]:
        """(attention_mask, segment_ids) for the model: after `with_host_facts` nothing the model
        must read on the device (None, None for rows of one unpadded document each; else None and
        the host-built `DocumentLayout`); before it, the batch's own tensors."""
        if self.plain:
            return None, None
        if self.layout is not None:
            return None, self.layout
        return self.attention_mask, self.segment_ids

    @property
    def num_documents(self) -> int:
        return sum(len(row) for row in self.sample_ids)

    def documents(self) -> torch.Tensor:
        """(B, T) int64: each token's document number, documents counted row-major in the order of
        ``sample_ids`` (a padded row is one document); -1 on padding."""
        if self.segment_ids is None:
            rows = torch.arange(self.input_ids.shape[0], device=self.input_ids.device)
            docs = rows[:, None].expand_as(self.input_ids)
        else:
            per_row = torch.tensor([0] + [len(row) for row in self.sample_ids[:-1]], device=self.segment_ids.device)
            docs = self.segment_ids + per_row.cumsum(0)[:, None]  # (B, T)
        return torch.where(self.attention_mask.bool(), docs, -1)


def with_host_facts(batch: Batch) -> Batch:
    """``batch`` (on the CPU, as collated) with its documents (`DocumentLayout`, lengths read on
    the host), its loss and real token counts (per document too), and whether its rows are plain
    causal sequences."""
    real = batch.attention_mask.bool()
    trainable = batch.next_token_labels() != IGNORE  # (B, T-1)
    batch.loss_tokens = int(trainable.sum())
    batch.document_tokens = torch.zeros(batch.num_documents, dtype=torch.long).index_add(
        0, batch.label_documents().reshape(-1), trainable.reshape(-1).long()).tolist()
    batch.real_tokens = int(real.sum())
    batch.plain = batch.segment_ids is None and bool(real.all())
    if not batch.plain:
        batch.layout = DocumentLayout.from_batch(batch.attention_mask, batch.segment_ids)
        batch.layout.host_lengths()  # computed here, on the CPU batch
    return batch


def check_loader_options(loader: str, item: str, n_items: int, batch_size: int, batching: str,
                         max_len: int | None, max_tokens: int | None) -> None:
    """ValueError for options a loader (of samples or of pairs) cannot batch with."""
    if not n_items:
        raise ValueError(f"{loader} needs at least one {item}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    if batching not in BATCHINGS:
        raise ValueError(f"batching={batching!r}; expected one of {', '.join(BATCHINGS)}")
    if batching == "pack" and max_len is None:
        raise ValueError("batching='pack' (pack=True) needs max_len, the length of a packed row")
    if max_tokens is not None and batching != "padding-free":
        raise ValueError(f"max_tokens applies to padding-free batches, not {batching!r}")


def first_over_budget(lengths: list[int], max_tokens: int | None) -> int | None:
    """The first item longer than ``max_tokens`` (no budget: None), which no batch can hold."""
    if max_tokens is None:
        return None
    return next((i for i, n in enumerate(lengths) if n > max_tokens), None)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate_padded(samples: list[Sample], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Right-pad samples into (B, T) tensors; T = longest, rounded up to `pad_to_multiple_of`."""
    width = round_up(max(len(s.input_ids) for s in samples), pad_to_multiple_of)
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


def collate_padding_free(samples: list[Sample], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
    """The samples as the documents of ONE row, (1, Σ len) rounded up to `pad_to_multiple_of`."""
    width = round_up(sum(len(s.input_ids) for s in samples), pad_to_multiple_of)
    row = pack_row([(s.input_ids, s.labels) for s in samples], width, pad_id)
    return {name: t[None] for name, t in row.items()}  # (1, width) each


class BatchLoader:
    """Batches of one epoch at a time; ``batches(epoch, start)`` resumes mid-epoch exactly.

    ``batching`` is one of `BATCHINGS`; left None it is "pack" with ``pack=True``, else "padded"
    (this class's historical default; the CLI's default is padding-free).
    """

    def __init__(self, samples: list[Sample], batch_size: int, *, pad_id: int, seed: int = 0,
                 shuffle: bool = True, pack: bool = False, max_len: int | None = None,
                 pad_to_multiple_of: int = 1, batching: str | None = None, max_tokens: int | None = None):
        batching = batching or ("pack" if pack else "padded")
        check_loader_options("BatchLoader", "sample", len(samples), batch_size, batching, max_len, max_tokens)
        self.samples, self.batch_size, self.pad_id, self.seed = samples, batch_size, pad_id, seed
        self.shuffle, self.batching, self.pack, self.max_len = shuffle, batching, batching == "pack", max_len
        self.pad_to_multiple_of, self.max_tokens = pad_to_multiple_of, max_tokens
        self.lengths = [len(s.input_ids) for s in samples]
        self._planned: tuple[int | None, list] = (None, [])  # (epoch, its groups): planned once per epoch
        too_long = first_over_budget(self.lengths, max_tokens)
        if too_long is not None:
            raise TokenBudgetError(f"{samples[too_long].source}: sample has {self.lengths[too_long]} tokens, more "
                                   f"than --max-tokens-per-batch {max_tokens}: raise it or lower --max-len (a "
                                   "sample is never split)")

    def order(self, epoch: int) -> list[int]:
        n = len(self.samples)
        return epoch_order(n, self.seed, epoch) if self.shuffle else list(range(n))

    def groups(self, epoch: int) -> list[list[list[int]]]:
        """Per batch of ``epoch``, the sample indices of each of its rows (planned once per epoch)."""
        if self._planned[0] != epoch:
            self._planned = (epoch, self._plan(epoch))
        return self._planned[1]

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        order = self.order(epoch)
        if self.pack:
            rows = plan_rows(self.lengths, order, self.max_len)
            return [rows[k:k + self.batch_size] for k in range(0, len(rows), self.batch_size)]
        groups = batch_groups(order, self.lengths, self.batch_size, self.max_tokens)
        if self.batching == "padding-free":
            return [[group] for group in groups]
        return [[[i] for i in group] for group in groups]

    def num_batches(self, epoch: int) -> int:
        return len(self.groups(epoch))

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` from batch index `start` on."""
        groups = self.groups(epoch)
        for index in range(start, len(groups)):
            yield self._collate(groups[index], epoch, index)

    def batch(self, epoch: int, index: int) -> Batch:
        """Batch ``index`` of ``epoch`` alone (under torchrun each rank collates only its own)."""
        return self._collate(self.groups(epoch)[index], epoch, index)

    def _collate(self, chunk: list[list[int]], epoch: int, index: int) -> Batch:
        if self.pack:
            packed = [pack_row([(self.samples[i].input_ids, self.samples[i].labels) for i in row],
                               self.max_len, self.pad_id) for row in chunk]
            tensors = {k: torch.stack([p[k] for p in packed]) for k in packed[0]}
        elif self.batching == "padding-free":
            tensors = collate_padding_free([self.samples[i] for i in chunk[0]], self.pad_id, self.pad_to_multiple_of)
        else:
            tensors = collate_padded([self.samples[row[0]] for row in chunk], self.pad_id,
                                     self.pad_to_multiple_of)
        return with_host_facts(Batch(**tensors, sample_ids=chunk, epoch=epoch, index=index))
