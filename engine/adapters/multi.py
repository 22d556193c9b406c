"""Several adapters over one base in one batch: each row of a batch uses its own adapter (or none).

`inject_adapters(model, adapters)` replaces every linear that any of the K adapters targets by a
`MultiLoRALinear`: it owns the frozen base (``nn.Linear`` or a `QuantizedLinear`, as `LoRALinear`
does) and the K adapters' weights stacked as buffers, A (K, r, in) and B (K, out, r) with r the
largest rank any adapter gives this module (smaller ranks zero-padded: exact), and the scales
(K,) fp32 (per module: ``rank_pattern`` / ``alpha_pattern`` / rsLoRA as each adapter's config
says). An adapter that does not adapt the module has zeros there, so its delta is exactly 0. For
x (B, T, in) and the adapter of each sequence ``ids`` (B,) (-1: the base)::

    y[b, t] = base(x[b, t]) + s_k · x[b, t]·A_kᵀ·B_kᵀ     k = ids[b]  (no term when k = -1)

computed by `kernels.lora_gather.lora_gather_checked` (the rows sorted by adapter once per forward shape
and shared by every layer). The ids of the batch are set for a block of forwards
(``with multi.selected(["a", "none", "b"]): …``, every prefill and decode step of one batch);
outside such a block the modules refuse to run. Inference only: the buffers have no gradients.

The adapters are read with `engine.adapters.switcher.read_adapter` and checked against the plain
model with `check_adapter_fits` (shapes, targets); what cannot be gathered is refused with an
InputError: a reward model's score head (modules_to_save), a model that already has LoRA, a
target whose weight dtype is not the model's, two adapters of one name. DoRA, LoRA bias and the
other PEFT features are refused by `read_adapter` already (`engine.adapters.peft_format`).

`adapter_specs` parses the ``--adapter NAME=DIR`` / ``DIR`` / ``none`` flags of `engine.generate`
and `engine.eval`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.adapters.lora import FrozenBaseLinear, LoRALinear
from engine.adapters.switcher import Adapter, check_adapter_fits
from engine.adapters.targets import replace_module
from engine.errors import InputError
from kernels.lora_gather import GatherRows, gather_rows, lora_gather_checked
from models.quantized import QuantizedLinear

NONE = "none"  # the base: no adapter for this row (id -1)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


# ----------------------------------------------------------------------------- the --adapter flags

@dataclass(frozen=True)
class AdapterSpec:
    """One ``--adapter`` value: ``NAME=DIR`` (name given), ``DIR`` (name None: the command names
    it) or ``none`` (the base: path None)."""

    name: str | None
    path: Path | None

    @property
    def is_base(self) -> bool:
        return self.path is None


def adapter_spec(text: str, flag: str = "--adapter") -> AdapterSpec:
    """``none`` → the base; an existing folder, or a value without '=' → a plain DIR; else
    ``NAME=DIR`` split at the first '=' (NAME: letters, digits, ``_ . + -``; not ``none``)."""
    if text == NONE:
        return AdapterSpec(NONE, None)
    if "=" not in text or Path(text).is_dir():
        if not text:
            raise InputError(f"{flag}: empty value; give DIR, NAME=DIR or none")
        return AdapterSpec(None, Path(text))
    name, _, path = text.partition("=")
    if not _NAME.fullmatch(name):
        raise InputError(f"{flag} {text}: {name!r} is not an adapter name (letters, digits, '_', '.', '+', '-'; "
                         "starting with a letter or digit)")
    if name == NONE:
        raise InputError(f"{flag} {text}: the name {NONE!r} is the base (give --adapter none)")
    if not path:
        raise InputError(f"{flag} {text}: no folder after '='")
    return AdapterSpec(name, Path(path))


def adapter_specs(values: Sequence[str], flag: str = "--adapter") -> list[AdapterSpec]:
    """Every value parsed (`adapter_spec`); InputError when two give the same NAME or none twice."""
    specs = [adapter_spec(v, flag) for v in values]
    named = [s.name for s in specs if s.name is not None]
    dup = next((n for n in named if named.count(n) > 1), None)
    if dup is not None:
        raise InputError(f"{flag}: {dup!r} is given twice" + (" (none is the base)" if dup == NONE else ""))
    return specs


# ----------------------------------------------------------------------------- the module

@dataclass
class AdapterSelection:
    """The adapter id of each sequence of the batch (B,) on the model's device, and its sorted
    rows per forward shape (prefill (B, P), decode (B, 1)), computed once for every layer."""

    ids: torch.Tensor  # (B,) int64, -1: the base
    num_adapters: int
    _rows: dict[tuple[int, ...], GatherRows] = field(default_factory=dict)

    def rows_for(self, x: torch.Tensor) -> GatherRows:
        lead = tuple(x.shape[:-1])
        if not lead or lead[0] != self.ids.shape[0]:
            raise ValueError(f"MultiLoRALinear: input of shape {tuple(x.shape)}, but {self.ids.shape[0]} sequences "
                             "are selected (the leading dim of x must be the batch)")
        if lead not in self._rows:
            per_token = self.ids.view(-1, *[1] * (len(lead) - 1)).expand(lead).reshape(-1)  # (B·T,)
            self._rows[lead] = gather_rows(per_token, self.num_adapters)
        return self._rows[lead]


class MultiLoRALinear(FrozenBaseLinear):
    """A frozen base linear and K stacked adapters; each row adds its selected adapter's update."""

    def __init__(self, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scales: torch.Tensor):
        super().__init__(base)
        self.register_buffer("lora_A", lora_A)  # (K, r, in)
        self.register_buffer("lora_B", lora_B)  # (K, out, r)
        self.register_buffer("scales", scales)  # (K,) fp32
        self.selection: AdapterSelection | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.selection is None:
            raise RuntimeError("MultiLoRALinear: no adapters selected for this batch; run the forward inside "
                               "`with multi.selected(rows):` (engine.adapters.multi)")
        rows = self.selection.rows_for(x)
        y = self.base(x).reshape(-1, self.out_features)  # (B·T, out), the base product's own output
        # operands checked at construction (shapes, dtype) and ids at selection: no per-call checks
        lora_gather_checked(y, x.reshape(-1, self.in_features), self.lora_A, self.lora_B, self.scales, rows.ids,
                            rows=rows)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"adapters={self.lora_A.shape[0]}, r={self.lora_A.shape[1]}"


# ----------------------------------------------------------------------------- injection

@dataclass
class MultiAdapters:
    """The K adapters injected into a model (`inject_adapters`): their names (id k = index k)
    and the modules that gather them."""

    model: nn.Module
    names: tuple[str, ...]
    modules: dict[str, MultiLoRALinear]

    def ids(self, rows: Sequence[str | int | None]) -> list[int]:
        """Adapter ids of ``rows``: a name, ``none`` / None (-1), or an id in [-1, K)."""
        out = []
        for row in rows:
            if row is None or row == NONE:
                out.append(-1)
            elif isinstance(row, int) and not isinstance(row, bool):
                if not -1 <= row < len(self.names):
                    raise InputError(f"adapter id {row}: expected -1 (the base) or 0..{len(self.names) - 1}")
                out.append(row)
            elif row in self.names:
                out.append(self.names.index(row))
            else:
                raise InputError(f"unknown adapter {row!r}: the adapters are {', '.join(self.names)} (or {NONE})")
        return out

    @contextlib.contextmanager
    def selected(self, rows: Sequence[str | int | None]) -> Iterator[None]:
        """Within the block, sequence b of every forward uses the adapter of ``rows[b]``."""
        device = next(iter(self.modules.values())).lora_A.device
        selection = AdapterSelection(torch.tensor(self.ids(rows), dtype=torch.int64, device=device), len(self.names))
        previous = {name: m.selection for name, m in self.modules.items()}
        for m in self.modules.values():
            m.selection = selection
        try:
            yield
        finally:
            for name, m in self.modules.items():
                m.selection = previous[name]

    def remove(self) -> None:
        """Put every base linear back (the plain model)."""
        for name, m in self.modules.items():
            replace_module(self.model, name, m.base)
        self.modules = {}


def _compute_dtype(model: nn.Module) -> torch.dtype:
    return model.model.embed_tokens.weight.dtype


@torch.no_grad()
def inject_adapters(model: nn.Module, adapters: Sequence[Adapter]) -> MultiAdapters:
    """Check the K adapters against the plain ``model`` and replace every targeted linear by a
    `MultiLoRALinear` holding them all (module docstring); returns the `MultiAdapters`."""
    if not adapters:
        raise InputError("inject_adapters: no adapter given")
    names = [a.name for a in adapters]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InputError(f"adapter name {dup!r} is given twice")
    if any(isinstance(m, (LoRALinear, MultiLoRALinear)) for m in model.modules()):
        raise InputError("the model already has adapters; inject several adapters into the plain base only")
    for adapter in adapters:
        adapter.require_lora("gathering several adapters per row")
        if adapter.config.modules_to_save:
            raise InputError(f"adapter {adapter.name!r} ({adapter.path}): a reward model's score head "
                             f"(modules_to_save={list(adapter.config.modules_to_save)}) cannot be gathered per row")
        check_adapter_fits(model, adapter)  # targets and shapes; records the layout (module -> r, scale)
    dtype = _compute_dtype(model)
    targets = [n for n, _ in model.named_modules() if any(n in a.layout for a in adapters)]  # model order
    modules = {}
    for name in targets:
        base = model.get_submodule(name)
        if isinstance(base, nn.Linear) and base.weight.dtype != dtype:
            raise InputError(f"{name}: weight dtype {base.weight.dtype} differs from the model's {dtype}; the "
                             "gathered adapters compute in one dtype")
        device = base.weight_device if isinstance(base, QuantizedLinear) else base.weight.device
        r = max(a.layout[name][0] for a in adapters if name in a.layout)
        lora_A = torch.zeros(len(adapters), r, base.in_features, dtype=dtype, device=device)
        lora_B = torch.zeros(len(adapters), base.out_features, r, dtype=dtype, device=device)
        scales = torch.zeros(len(adapters), dtype=torch.float32, device=device)
        for k, adapter in enumerate(adapters):
            if name in adapter.layout:
                rank, scale = adapter.layout[name]
                lora_A[k, :rank] = adapter.weights[name]["lora_A"].to(device=device, dtype=dtype)
                lora_B[k, :, :rank] = adapter.weights[name]["lora_B"].to(device=device, dtype=dtype)
                scales[k] = scale
        modules[name] = MultiLoRALinear(base, lora_A, lora_B, scales)
        replace_module(model, name, modules[name])
    return MultiAdapters(model, tuple(names), modules)
