"""The base model against its adapters: loss and perplexity of each on each evaluation set.

For one evaluation set of samples (input_ids, labels with -100 where no loss is taken):

    loss = (1 / N) Σ_{trainable t} -log p(labels[t+1] | tokens ≤ t),    perplexity = exp(loss)

with N the number of trainable (shifted) labels, summed over the whole set before dividing (a mean
per token, not a mean of batch means). The domain set is SFT data, so only completion / assistant
tokens count; the general set is plain text, so every token after the first does. The same
`engine.losses.causal_lm.mean_loss` as training's evaluation computes it, so eval and train losses
agree. The base is loaded once; the adapters are switched in and out of it
(`engine.adapters.switcher`).

On one set (``kl_set``: the general text, in `engine.eval`) each adapter row also gets its mean
KL(base ‖ adapter) per counted token, computed in the same pass as its loss there
(`engine.kl_to_base`); the base row's is 0 by definition (not computed). The base row keeps its
hidden states on that set (in host memory, `engine.kl_to_base.base_loss_and_states`), so an
adapter's KL costs its own forward only, not the base's again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.adapters.multi import adapter_specs
from engine.adapters.switcher import Adapter, base_then_adapters, check_adapter_fits, read_adapter
from engine.data.samples import Sample
from engine.errors import InputError
from engine.kl_to_base import base_loss_and_states, loss_and_kl_to_base
from engine.losses.causal_lm import LossResult, mean_loss
from models.llama import LlamaForCausalLM
from models.loading import read_config

BASE = "base"


@dataclass
class Row:
    """One line of the comparison: a name ("base" or the adapter), its results per set, and its
    mean KL(base ‖ this) per token on the sets where it was measured (0.0 for the base)."""

    name: str
    results: dict[str, LossResult]
    kl_to_base: dict[str, float] = field(default_factory=dict)

    def delta(self, base: "Row", set_name: str) -> float:
        """loss(this) - loss(base) on one set: negative = better than the base."""
        return self.results[set_name].loss - base.results[set_name].loss


def compare(model: nn.Module, adapters: list[Adapter], sets: dict[str, list[Sample]], *, batch_size: int,
            pad_id: int, device: torch.device | str, progress: bool = True, kl_set: str | None = None) -> list[Row]:
    """The base row, then one row per adapter, each evaluated on every set (e.g. domain, general);
    on ``kl_set`` (one of ``sets``, or None) also the KL to the base."""
    rows, base_states = [], None
    for i, name in enumerate(base_then_adapters(model, adapters, BASE)):
        results, kl = {}, {}
        for set_name, samples in sets.items():
            options = dict(batch_size=batch_size, pad_id=pad_id, device=device, desc=f"{name} / {set_name}",
                           progress=progress)
            if set_name != kl_set:
                results[set_name] = mean_loss(model, samples, **options)
            elif i == 0:  # the base: KL(base ‖ base) = 0; its states serve every adapter's KL
                results[set_name], base_states = base_loss_and_states(model, samples, **options)
                kl[set_name] = 0.0
            else:
                both = loss_and_kl_to_base(model, samples, **options, base_states=base_states)
                results[set_name], kl[set_name] = both.loss, both.kl_to_base
        rows.append(Row(name, results, kl))
    return rows


def markdown_table(rows: list[Row], set_names: list[str]) -> str:
    """Rows: base, each adapter. Per set: loss, perplexity, and the loss change against the base
    (with the perplexity change in percent); where measured, then the KL to the base ("—" for the base)."""
    base = rows[0]
    header = ["model"]
    for s in set_names:
        header += [f"{s} loss", f"{s} ppl", f"Δ {s} vs base"] + ([f"{s} KL to base"] if s in base.kl_to_base else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
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
            if s in base.kl_to_base:
                cells.append("—" if row is base else f"{row.kl_to_base[s]:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_to_json(rows: list[Row]) -> list[dict]:
    base = rows[0]
    return [{"name": row.name,
             **{s: {**r.to_json(), "delta_loss_vs_base": row.delta(base, s),
                    "perplexity_ratio_vs_base": r.perplexity / base.results[s].perplexity,
                    **({"kl_to_base": row.kl_to_base[s]} if s in row.kl_to_base else {})}
                for s, r in row.results.items()}}
            for row in rows]


def read_adapters(values: list[str], model_dir: Path) -> list[Adapter]:
    """Read every ``--adapter`` (``DIR``: named by its path, as always; ``NAME=DIR``: named NAME;
    ``none``: the base, whose row is always first, so it adds none) and check each against the
    base's shapes on a meta-device model (no weights)."""
    specs = adapter_specs(values)
    folders = [s for s in specs if not s.is_base]
    paths = [str(s.path) for s in folders]
    if len(set(paths)) != len(paths):
        raise InputError(f"--adapter: the same folder is given twice ({', '.join(paths)})")
    if any(s.name == BASE for s in folders):
        raise InputError(f"--adapter {BASE}=DIR: {BASE!r} is the base row's name; choose another (--adapter none "
                         "is the base)")
    adapters = [read_adapter(s.path, name=s.name) for s in folders]
    names = [a.name for a in adapters]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InputError(f"--adapter: two rows would be named {dup!r}; name them with NAME=DIR")
    for adapter in adapters:
        if adapter.config.modules_to_save:
            raise InputError(f"--adapter {adapter.path}: a reward model (a score head beside LoRA); measure it with "
                             "--reward-model")
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(read_config(model_dir))
    for adapter in adapters:
        check_adapter_fits(skeleton, adapter)
    return adapters
