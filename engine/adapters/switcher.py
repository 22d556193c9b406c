"""Evaluation against the base model: loss and perplexity of the base and of each adapter.

For one evaluation set of samples (input_ids, labels with -100 where no loss is taken):

    loss = (1 / N) Σ_{trainable t} -log p(labels[t+1] | tokens ≤ t),    perplexity = exp(loss)

with N the number of trainable (shifted) labels, summed over the whole set before dividing (a mean
per token, not a mean of batch means). The domain set is SFT data, so only completion / assistant
tokens count; the general set is plain text, so every token after the first does. The same
``loss_sum`` / ``count_trainable`` as training compute it, so eval and train losses agree.

Several adapters on one base: the base is loaded once. `read_adapter` keeps each adapter's config
and weights in memory (checked against the model's shapes before any is applied, see
`check_adapter_fits`), and `AdapterSwitcher.activate` applies one at a time: when the next adapter
has the same layout (adapted modules, ranks and scales) as the active one its weights are copied
into the existing LoRA modules; otherwise the plain base linears are put back and the new layout is
injected. ``activate(None)`` puts the plain base back (the "base" row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.adapters import (
    adapter_targets,
    assign_adapter_weights,
    read_adapter_config,
    read_adapter_weights,
)
from engine.data import Sample
from engine.lora import LoRAConfig, inject_lora, lora_modules, lora_scale
from engine.loss import LossResult, mean_loss

BASE = "base"


# ----------------------------------------------------------------------------- adapters

@dataclass
class Adapter:
    """One adapter held in memory: its config, fp32 weights per module, and its module layout."""

    name: str
    path: Path
    config: LoRAConfig
    weights: dict[str, dict[str, torch.Tensor]]
    layout: dict[str, tuple[int, float]] = field(default_factory=dict)  # module -> (r, scale)


def read_adapter(path: str | Path, name: str | None = None) -> Adapter:
    """Config and weights of a PEFT-format folder (InputError when missing or malformed)."""
    path = Path(path)
    config = read_adapter_config(path)
    weights = {module: {k: t.to(torch.float32) for k, t in pair.items()}
               for module, pair in read_adapter_weights(path).items()}
    return Adapter(name or str(path), path, config, weights)


def check_adapter_fits(model: nn.Module, adapter: Adapter) -> None:
    """Check the adapter's targets and every A/B shape against a model *without* LoRA (a meta-device
    model will do, nothing is computed), and record its layout. Raises InputError naming the file."""
    targets = adapter_targets(model, adapter.path, adapter.config, adapter.weights)
    cfg = adapter.config
    adapter.layout = {name: (cfg.rank_for(name), lora_scale(cfg.rank_for(name), cfg.alpha_for(name), cfg.use_rslora))
                      for name in targets}


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def remove_lora(model: nn.Module) -> None:
    """Put every LoRALinear's own base linear back in its place (the plain base model)."""
    for name, module in lora_modules(model).items():
        _replace_module(model, name, module.base)


class AdapterSwitcher:
    """Applies one in-memory `Adapter` (or none) at a time to a model loaded once."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.active: Adapter | None = None

    @torch.no_grad()
    def activate(self, adapter: Adapter | None) -> None:
        """Make ``adapter`` the active one (None: the plain base). Its layout must have been
        recorded by `check_adapter_fits`."""
        if adapter is None:
            remove_lora(self.model)
            self.active = None
            return
        if not adapter.layout:
            raise ValueError(f"adapter {adapter.name!r}: call check_adapter_fits before activating it")
        if self.active is None or self.active.layout != adapter.layout:
            remove_lora(self.model)
            inject_lora(self.model, adapter.config)
        # With the same layout the existing LoRA modules only need the new weights.
        assign_adapter_weights(self.model, adapter.weights)
        self.model.eval()  # no LoRA dropout
        self.active = adapter


# ----------------------------------------------------------------------------- the comparison

@dataclass
class Row:
    """One line of the comparison: a name ("base" or the adapter) and its results per set."""

    name: str
    results: dict[str, LossResult]

    def delta(self, base: "Row", set_name: str) -> float:
        """loss(this) - loss(base) on one set: negative = better than the base."""
        return self.results[set_name].loss - base.results[set_name].loss


def compare(model: nn.Module, adapters: list[Adapter], sets: dict[str, list[Sample]], *, batch_size: int,
            pad_id: int, device: torch.device | str, progress: bool = True) -> list[Row]:
    """The base row, then one row per adapter, each evaluated on every set (e.g. domain, general)."""
    remove_lora(model)
    for adapter in adapters:
        check_adapter_fits(model, adapter)
    switcher = AdapterSwitcher(model)
    rows = []
    for adapter in [None, *adapters]:
        switcher.activate(adapter)
        name = BASE if adapter is None else adapter.name
        results = {set_name: mean_loss(model, samples, batch_size=batch_size, pad_id=pad_id, device=device,
                                       desc=f"{name} / {set_name}", progress=progress)
                   for set_name, samples in sets.items()}
        rows.append(Row(name, results))
    switcher.activate(None)
    return rows


def markdown_table(rows: list[Row], set_names: list[str]) -> str:
    """Rows: base, each adapter. Per set: loss, perplexity, and the loss change against the base
    (with the perplexity change in percent)."""
    header = ["model"]
    for s in set_names:
        header += [f"{s} loss", f"{s} ppl", f"Δ {s} vs base"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = rows[0]
    for row in rows:
        cells = [row.name]
        for s in set_names:
            r = row.results[s]
            cells += [f"{r.loss:.4f}", f"{r.perplexity:.3f}"]
            if row is base:
                cells.append("—")
            else:
                ppl_change = 100.0 * (r.perplexity / base.results[s].perplexity - 1.0)
                cells.append(f"{row.delta(base, s):+.4f} ({ppl_change:+.1f}% ppl)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_to_json(rows: list[Row]) -> list[dict]:
    base = rows[0]
    return [{"name": row.name,
             **{s: {**r.to_json(), "delta_loss_vs_base": row.delta(base, s),
                    "perplexity_ratio_vs_base": r.perplexity / base.results[s].perplexity}
                for s, r in row.results.items()}}
            for row in rows]
