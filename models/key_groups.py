"""Collecting the keys of each pre-quantized linear across the shards of a checkpoint.

A quantized linear ``<prefix>`` of a bitsandbytes folder is stored as several tensors (its codes
``<prefix>.weight`` and statistics beside it), which a sharded folder may spread over several
files. `KeyGroups` holds the keys of each linear until its group is complete, then builds the
weight once; the formats (`models.bnb_checkpoint` for 4-bit NF4, `models.bnb8_checkpoint` for
8-bit) say which keys belong to which linear (`prefix_of`), which are still missing (`missing`)
and how a complete group becomes a weight (`build`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.errors import InputError

Group = dict[str, tuple[torch.Tensor, Path]]  # suffix after "<prefix>." -> (tensor, file it came from)


class KeyGroups:
    """``claims(name)``: whether a key belongs to a quantized linear; ``add`` stores it and, once
    the linear's group is complete, returns ``(prefix + ".weight", the built weight)``; ``finish``
    raises for any linear left incomplete and returns the files each weight came from."""

    label = "quantized linear"  # how errors name a linear of this format

    def __init__(self, expected: dict[str, tuple[int, ...]], device: torch.device | str):
        self.expected, self.device = expected, device
        self.pending: dict[str, Group] = {}
        self.done: dict[str, Path] = {}  # weight name -> file of its codes

    def prefix_of(self, name: str) -> str | None:
        """The quantized linear a key belongs to, else None."""
        raise NotImplementedError

    def missing(self, prefix: str, group: Group) -> list[str]:
        """The suffixes ``group`` still lacks."""
        raise NotImplementedError

    def build(self, prefix: str, group: Group) -> Any:
        """The weight of a complete group, on ``self.device`` (InputError naming the file if bad)."""
        raise NotImplementedError

    def claims(self, name: str) -> bool:
        return self.prefix_of(name) is not None

    def add(self, name: str, tensor: torch.Tensor, file: Path) -> tuple[str, Any] | None:
        prefix = self.prefix_of(name)
        suffix = name[len(prefix) + 1:]
        if prefix + ".weight" in self.done:
            raise InputError(f"{file}: tensor {name!r}: {prefix} is already complete "
                             f"(an extra or duplicate key of a quantized linear)")
        group = self.pending.setdefault(prefix, {})
        if suffix in group:
            raise InputError(f"{file}: tensor {name!r} also in {group[suffix][1].name}")
        group[suffix] = (tensor, file)
        if self.missing(prefix, group):
            return None
        weight = self.build(prefix, self.pending.pop(prefix))
        self.done[prefix + ".weight"] = group["weight"][1]
        return prefix + ".weight", weight

    def check_shape(self, prefix: str, group: Group, shape: tuple[int, ...]) -> None:
        name = prefix + ".weight"
        if shape != self.expected[name]:
            raise InputError(f"{group['weight'][1]}: quantized tensor {name!r} has shape {shape}, "
                             f"expected {self.expected[name]} from config.json")

    def finish(self) -> dict[str, Path]:
        """Raise `InputError` for the first incomplete linear, naming the missing key and the
        file(s) holding the rest of its group; else the weight names loaded, with their files."""
        for prefix, group in self.pending.items():
            missing = self.missing(prefix, group)
            files = ", ".join(sorted({str(f) for _, f in group.values()}))
            raise InputError(f"{files}: {self.label} {prefix} lacks tensor(s) "
                             f"{', '.join(f'{prefix}.{s}' for s in missing)} (in no safetensors file of the folder)")
        return dict(self.done)
