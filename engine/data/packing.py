"""Packing: place whole documents into rows of exactly ``max_len`` tokens.

Documents are never split (an SFT sample cut from its prompt teaches nothing useful), so every
document must be at most ``max_len`` long (the length policy ensures it). Placement is best fit
in epoch order: each document goes to the open row with the least room that still fits it, or
starts a new row; rows come out in the order they were opened. This keeps most rows nearly full
and is a pure function of the document order, hence deterministic and resumable.

In a packed row each document gets its own segment id (0, 1, ... in row order) and position ids
restarting at 0; the padding that fills the rest of the row gets the next segment id, its own,
and attention_mask 0. The model lets a token attend only to earlier tokens of its own segment, so
attention never crosses documents. Labels at each document's first position are -100 already
(`engine.data.render`), so no document's first token is predicted from the previous one.
"""

from __future__ import annotations

import bisect

import torch

from engine.data.render import IGNORE


def plan_rows(lengths: list[int], order: list[int], max_len: int) -> list[list[int]]:
    """Group document indices (taken in `order`) into rows of total length <= `max_len`."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, row index) of rows with free space
    for doc in order:
        length = lengths[doc]
        if length > max_len:
            raise ValueError(f"document {doc} has {length} tokens > max_len={max_len}; "
                             "apply the length policy before packing")
        at = bisect.bisect_left(room, (length, -1))
        if at < len(room):
            free, row = room.pop(at)
        else:
            free, row = max_len, len(rows)
            rows.append([])
        rows[row].append(doc)
        if free - length > 0:
            bisect.insort(room, (free - length, row))
    return rows


def pack_row(docs: list[tuple[list[int], list[int]]], max_len: int, pad_id: int
             ) -> dict[str, torch.Tensor]:
    """One packed row from ``[(input_ids, labels), ...]``: tensors of shape ``(max_len,)``.

    Returns input_ids, labels, attention_mask, position_ids and segment_ids.
    """
    ids, labels, positions, segments = [], [], [], []
    for segment, (doc_ids, doc_labels) in enumerate(docs):
        ids += doc_ids
        labels += doc_labels
        positions += range(len(doc_ids))
        segments += [segment] * len(doc_ids)
    used, pad = len(ids), max_len - len(ids)
    if pad < 0:
        raise ValueError(f"documents hold {used} tokens, more than max_len={max_len}")
    mask = [1] * used + [0] * pad
    ids += [pad_id] * pad
    labels += [IGNORE] * pad
    positions += range(pad)
    segments += [len(docs)] * pad
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return {"input_ids": as_long(ids), "labels": as_long(labels), "attention_mask": as_long(mask),
            "position_ids": as_long(positions), "segment_ids": as_long(segments)}
