"""Batches of preference pairs for DPO: chosen and rejected of B pairs in one forward.

A batch holds B pairs taken consecutively in the epoch order (`engine.data.batching.epoch_order`,
so resuming at (epoch, batch index) is exact), ``batch_size`` of them, or with ``max_tokens``
(``--max-tokens-per-batch``, padding-free only) as many as fit in that many tokens, counting both
sequences of a pair. Its 2B documents are always in the order ``[c_1 … c_B, r_1 … r_B]``
(prompt + chosen, prompt + rejected), laid out by ``batching``:

* ``padded``: 2B right-padded rows, one document each (``sample_ids[row] = [pair]``);
* ``padding-free``: ONE row of the 2B documents concatenated, (1, Σ len), each its own segment
  with positions from 0 (``sample_ids = [[p_1 … p_B, p_1 … p_B]]``): the prompt is never padded;
* ``pack``: the 2B documents filled in order into rows of exactly ``max_len`` tokens (next fit: a
  document that does not fit the current row opens the next one), so that the row-major order of
  the documents is still ``[c_1 … c_B, r_1 … r_B]``.

In every layout `Batch.documents` numbers the tokens by document in that order, so the
per-completion log-probabilities come out as a (2B,) vector, chosen half first, whatever the layout
(`engine.losses.causal_lm.completion_logps`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from engine.data.batching import (
    Batch,
    TokenBudgetError,
    batch_groups,
    check_loader_options,
    first_over_budget,
    collate_padded,
    collate_padding_free,
    epoch_order,
    with_host_facts,
)
from engine.data.packing import pack_row

if TYPE_CHECKING:
    from engine.data.preferences import PreferencePair


def next_fit_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """Consecutive documents (indices into ``lengths``) grouped into rows of at most ``max_len``."""
    rows: list[list[int]] = []
    used = max_len + 1
    for doc, length in enumerate(lengths):
        if length > max_len:
            raise ValueError(f"document {doc} has {length} tokens > max_len={max_len}")
        if used + length > max_len:
            rows.append([])
            used = 0
        rows[-1].append(doc)
        used += length
    return rows


class PairBatchLoader:
    """Batches of B pairs as 2B documents [chosen…, rejected…]; ``batches(epoch, start)`` resumes exactly."""

    def __init__(self, pairs: list[PreferencePair], batch_size: int, *, pad_id: int, seed: int = 0,
                 shuffle: bool = True, batching: str = "padded", max_len: int | None = None,
                 max_tokens: int | None = None):
        check_loader_options("PairBatchLoader", "pair", len(pairs), batch_size, batching, max_len, max_tokens)
        self.pairs, self.batch_size, self.pad_id, self.seed, self.shuffle = pairs, batch_size, pad_id, seed, shuffle
        self.batching, self.max_len, self.max_tokens = batching, max_len, max_tokens
        self.lengths = [2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs]  # both sequences
        self._planned: tuple[int | None, list] = (None, [])  # (epoch, its groups): planned once per epoch
        too_long = first_over_budget(self.lengths, max_tokens)
        if too_long is not None:
            raise TokenBudgetError(f"{pairs[too_long].source}: pair has {self.lengths[too_long]} tokens (prompt + "
                                   f"chosen and prompt + rejected), more than --max-tokens-per-batch {max_tokens}: raise it or lower "
                                   "--max-len (a pair is never split)")

    def order(self, epoch: int) -> list[int]:
        n = len(self.pairs)
        return epoch_order(n, self.seed, epoch) if self.shuffle else list(range(n))

    def groups(self, epoch: int) -> list[list[int]]:
        """The pairs of each batch of ``epoch`` (planned once per epoch)."""
        if self._planned[0] != epoch:
            self._planned = (epoch, batch_groups(self.order(epoch), self.lengths, self.batch_size, self.max_tokens))
        return self._planned[1]

    def num_batches(self, epoch: int) -> int:
        return len(self.groups(epoch))

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` from batch index `start` on."""
        groups = self.groups(epoch)
        for index in range(start, len(groups)):
            yield self.collate(groups[index], epoch, index)

    def batch(self, epoch: int, index: int) -> Batch:
        """Batch ``index`` of ``epoch`` alone (under torchrun each rank collates only its own)."""
        return self.collate(self.groups(epoch)[index], epoch, index)

    def documents(self, chunk: list[int]) -> list:
        """The 2B documents of a batch as `Sample` rows: ``[c_1 … c_B, r_1 … r_B]``."""
        both = [self.pairs[i].rows() for i in chunk]
        return [c for c, _ in both] + [r for _, r in both]

    def rows_of(self, doc_lengths: list[int]) -> list[list[int]]:
        """Indices into the batch's documents (of these lengths, in order) of each of its rows."""
        if self.batching == "padded":
            return [[d] for d in range(len(doc_lengths))]
        if self.batching == "padding-free":
            return [list(range(len(doc_lengths)))]
        return next_fit_rows(doc_lengths, self.max_len)

    def collate(self, chunk: list[int], epoch: int = 0, index: int = 0) -> Batch:
        docs = self.documents(chunk)
        owner = chunk + chunk  # the pair of each document
        rows = self.rows_of([len(d.input_ids) for d in docs])
        if self.batching == "padded":
            tensors = collate_padded(docs, self.pad_id)
        elif self.batching == "padding-free":
            tensors = collate_padding_free(docs, self.pad_id)
        else:
            packed = [pack_row([(docs[d].input_ids, docs[d].labels) for d in row], self.max_len, self.pad_id)
                      for row in rows]
            tensors = {k: torch.stack([p[k] for p in packed]) for k in packed[0]}
        return with_host_facts(Batch(**tensors, sample_ids=[[owner[d] for d in row] for row in rows],
                                     epoch=epoch, index=index))


def pair_loaders(train: list[PreferencePair], held_out: list[PreferencePair], batch_size: int, *, pad_id: int,
                 seed: int, batching: str, max_len: int,
                 max_tokens: int | None = None) -> tuple[PairBatchLoader, PairBatchLoader | None]:
    """A preference run's loaders: the training pairs in their (seed, epoch) order, and the held-out
    pairs in file order (None without any), both laid out as ``batching``."""
    layout = {"batching": batching, "max_len": max_len}
    loader = PairBatchLoader(train, batch_size, pad_id=pad_id, seed=seed, max_tokens=max_tokens, **layout)
    eval_loader = PairBatchLoader(held_out, batch_size, pad_id=pad_id, shuffle=False, **layout) if held_out else None
    return loader, eval_loader
