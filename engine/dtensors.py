"""Moving LoRA tensors between their sharded form under FSDP2 (a `DTensor`) and their full form
(a plain tensor, what adapters and checkpoints hold), for any code that reads or writes them.

Both functions are the identity on plain tensors, so the single-process path is unchanged. Under
FSDP2 ``full_tensor`` is a collective (an all-gather): every rank must call it, in the same order.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``t`` itself, or a `DTensor`'s shards gathered from every rank."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``full`` (a plain tensor every rank holds whole) laid out as ``reference``: on its device,
    and for a `DTensor` cut to this rank's shard of the same placements (no communication: each
    rank keeps its own part of its own copy). The dtype is ``full``'s."""
    if isinstance(reference, DTensor):
        return distribute_tensor(full.to(reference.device), reference.device_mesh, reference.placements,
                                 src_data_rank=None)
    return full.to(reference.device)


@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """``param ← full`` (cast to param's dtype), ``param`` plain or sharded."""
    param.copy_(like(full.to(param.dtype), param))
