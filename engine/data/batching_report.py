"""What a batching costs: the token positions one epoch computes, and how many of them are padding.

A batch of R rows of width W computes R·W positions (every layer, every position); of these only
the documents' tokens are real, the rest is padding. For one epoch (epoch 0's order; later epochs
differ only by the shuffle):

    tokens            Σ document lengths (the real tokens)
    positions         Σ_batches R·W of the chosen batching
    padding_fraction  1 − tokens / positions

and the same for padded batches of ``--batch-size`` (``padded_positions``,
``padded_padding_fraction``), what the run would have cost without padding-free batches. The
figures are computed from the lengths alone, no tensor is built. Written to data_report.json
(`engine.run.session.Run.start`) and printed with the other data reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.data.batching import BatchLoader, batch_groups, round_up
from engine.data.pair_batching import PairBatchLoader


@dataclass
class BatchingReport:
    batching: str
    batch_size: int
    max_tokens_per_batch: int | None
    batches: int               # per epoch
    documents: int             # sequences per epoch (2 per preference pair)
    tokens: int
    positions: int
    padding_fraction: float
    padded_positions: int
    padded_padding_fraction: float

    def summary(self) -> str:
        budget = f", at most {self.max_tokens_per_batch} tokens per batch" if self.max_tokens_per_batch else ""
        text = (f"batching {self.batching}{budget}: {self.batches} batches, {self.tokens:,} tokens per epoch, "
                f"padding {100 * self.padding_fraction:.1f}% of {self.positions:,} positions")
        if self.batching != "padded":
            text += (f" (padded batches of {self.batch_size} would be {100 * self.padded_padding_fraction:.1f}% "
                     f"padding, {self.padded_positions:,} positions)")
        return text


def layout_positions(batches: list[list[list[int]]], fixed_width: int | None = None, multiple: int = 1) -> int:
    """Σ R·W over batches given as rows of document lengths; W is ``fixed_width`` (packed rows) or
    the longest row rounded up to ``multiple``."""
    total = 0
    for rows in batches:
        width = fixed_width or round_up(max(sum(row) for row in rows), multiple)
        total += len(rows) * width
    return total


def _report(loader, layout: list[list[list[int]]], padded: list[list[list[int]]], multiple: int) -> BatchingReport:
    tokens = sum(n for rows in padded for row in rows for n in row)
    positions = layout_positions(layout, loader.max_len if loader.batching == "pack" else None, multiple)
    padded_positions = layout_positions(padded, None, multiple)
    return BatchingReport(loader.batching, loader.batch_size, loader.max_tokens, len(layout),
                          sum(len(row) for rows in padded for row in rows), tokens, positions,
                          1 - tokens / positions, padded_positions, 1 - tokens / padded_positions)


def sft_batching_report(loader: BatchLoader) -> BatchingReport:
    """The cost of an SFT `BatchLoader`'s epoch 0 against padded batches of its batch size."""
    lengths = loader.lengths
    layout = [[[lengths[i] for i in row] for row in rows] for rows in loader.groups(0)]
    padded = [[[lengths[i]] for i in g] for g in batch_groups(loader.order(0), lengths, loader.batch_size)]
    return _report(loader, layout, padded, loader.pad_to_multiple_of)


def dpo_batching_report(loader: PairBatchLoader) -> BatchingReport:
    """The cost of a `PairBatchLoader`'s epoch 0 against padded batches of its batch size."""
    def docs(chunk: list[int]) -> list[int]:
        return [len(d.input_ids) for d in loader.documents(chunk)]

    layout = [[[lengths[d] for d in row] for row in loader.rows_of(lengths)]
              for lengths in (docs(g) for g in loader.groups(0))]
    padded = [[[n] for n in docs(g)] for g in batch_groups(loader.order(0), loader.lengths, loader.batch_size)]
    return _report(loader, layout, padded, 1)
