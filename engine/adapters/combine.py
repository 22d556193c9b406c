"""Fold several LoRA adapters of one base into ONE adapter, as PEFT 0.21's ``add_weighted_adapter``
does for ``combination_type`` "linear", "cat", "magnitude_prune", "ties", "dare_linear" and
"dare_ties" (the same math, written here; peft is never imported).

Each input adapter i has, per module, A_i (r, in), B_i (out, r) and its scale s_i (alpha/r, or
alpha/sqrt(r) for rsLoRA, after rank/alpha patterns), and a user weight w_i. None of these types
goes through an SVD of the delta weights (PEFT's ``*_svd`` types do, and are not offered here).

``cat`` is exact: the factors are stacked, so that s'·B'A' = Σ_i w_i s_i B_i A_i with s' = 1::

    A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...]   (R, in)     B' = [B_1 | B_2 | ...]   (out, R)

with R = Σ_i r_i (r_i the largest rank of adapter i, rank_pattern included); a module that some
adapters do not adapt (or adapt at a smaller rank) gets its parts in the first rows and columns
and zeros after them, as PEFT fills its zero-initialised rank-R tensors. Ranks may differ.

The others combine the factors entry by entry, so every input must have the same rank r, and the
result has rank r too. The weight and scale are split between the factors, the sign on A only:

    a_i = sign(w_i s_i) sqrt(|w_i s_i|),   b_i = sqrt(|w_i s_i|)        (python floats, then fp32)

and then A' = merge({A_i}, {a_i}), B' = merge({B_i}, {b_i}), with, for tensors T_i (stacked on a
new first axis) and their factor weights c_i (the a_i or the b_i):

* linear:     merge = sum_i c_i T_i.
* magnitude_prune: T_i <- T_i keeping its k = int(density * numel) largest |entries| (others 0;
              density >= 1 keeps all), then linear.
* dare_linear: T_i <- T_i * Bernoulli(density) / density (random drop with rescale), then linear.
* ties:       T_i <- T_i keeping its k = int(density * numel) largest |entries| (others 0;
              density >= 1 keeps all); elected sign per entry sigma = +1 where sum_i T_i >= 0
              (majority sign "total"; "frequency": sum_i sign(T_i) >= 0), else -1; the mask
              m_i = [sign(T_i) == sigma] (pruned zeros never count); merge = sum_i c_i T_i m_i /
              max(sum_i m_i, 1). The sign is elected on the unweighted T_i, as PEFT does.
* dare_ties:  T_i <- T_i * Bernoulli(density) / density (random drop with rescale), then the ties
              election and disjoint merge above.

The result is written with s' = 1: r' = r (cat: R), lora_alpha' = r', ``rank_pattern``/``alpha_pattern`` {},
``target_modules`` the union of the inputs' (a list), or for regex strings "(t_1)|(t_2)|...",
other fields (dropout, exclude_modules) from the first adapter, as PEFT does, so that
``PeftModel`` loads our folder as the same model as its own combined adapter. One deliberate
difference: PEFT keeps ``use_rslora`` of the first adapter, which with lora_alpha' = r makes its
scale sqrt(r) instead of 1 (a PEFT quirk that scales the whole combination); we write
``use_rslora: false`` so that s' = 1 as the formulas assume. The factors are PEFT's either way.

A module targeted by only some adapters is combined from those only (PEFT's rule). With one
adapter PEFT switches to "linear"; so do we.

dare randomness (dare_linear, dare_ties): ``--seed S`` gives PEFT's result for
``torch.manual_seed(S)`` right before ``add_weighted_adapter`` on a CPU model. The masks are
``torch.bernoulli(full_like(T, density), generator=g)``, drawn in PEFT's order: modules in the model's order (layer by layer: q, k, v, o,
gate, up, down; then lm_head), A before B, adapters in the order given. ``g`` is a CPU generator
seeded with S and first advanced as PEFT's injection of the new adapter advances torch's global
generator (`advance_like_peft_injection`: per new layer, the default inits of
``nn.Linear(in, r)`` and ``nn.Linear(r, out)`` and PEFT's Kaiming init of A, three uniform fills;
PEFT 0.21.2's behaviour, checked by the tests). A CUDA model draws from the CUDA generator instead.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.adapters.lora import ALL_LINEAR, LLAMA_LINEARS, OUTPUT_HEAD, LoRAConfig, lora_scale
from engine.adapters.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    read_adapter_config,
    read_adapter_weights,
    write_adapter_folder,
)
from engine.errors import InputError
from engine.run.folder import is_inside

COMBINATIONS = ("linear", "cat", "magnitude_prune", "ties", "dare_linear", "dare_ties")
NO_DENSITY = ("linear", "cat")  # the types that keep every entry
MAJORITY_SIGN = ("total", "frequency")


@dataclass
class Source:
    """One input adapter: its folder, raw ``adapter_config.json``, parsed config and weights."""

    path: str
    raw: dict[str, Any]
    cfg: LoRAConfig
    weights: dict[str, dict[str, torch.Tensor]]

    @classmethod
    def read(cls, path: str | os.PathLike) -> Source:
        cfg = read_adapter_config(path)
        raw = json.loads((Path(path) / CONFIG_NAME).read_text())
        if cfg.modules_to_save:
            raise InputError(f"--adapter {path}: a reward model (its score head is trained whole, not LoRA); only "
                             "causal-LM adapters can be combined")
        return cls(str(path), raw, cfg, read_adapter_weights(path))

    def scale(self, module: str) -> float:
        return lora_scale(self.cfg.rank_for(module), self.cfg.alpha_for(module), self.cfg.use_rslora)

    def largest_rank(self) -> int:
        """r, or the largest rank of its rank_pattern: what PEFT allots to the adapter in ``cat``."""
        return max([self.cfg.r, *self.cfg.rank_pattern.values()])


@dataclass
class Combination:
    """How to combine: PEFT's combination_type, density and majority_sign_method; the dare seed."""

    kind: str
    weights: list[float]
    density: float | None = None
    majority_sign: str = "total"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in COMBINATIONS:
            raise InputError(f"--combine must be one of {', '.join(COMBINATIONS)}, got {self.kind!r}")
        if self.majority_sign not in MAJORITY_SIGN:
            raise InputError(f"--majority-sign must be 'total' or 'frequency', got {self.majority_sign!r}")
        if not all(math.isfinite(w) for w in self.weights):
            raise InputError(f"--weights must be finite numbers, got {self.weights}")
        if self.kind in NO_DENSITY and self.density is not None:
            raise InputError(f"--density does not apply to {self.kind} (it keeps every entry)")
        if self.kind not in NO_DENSITY:
            if self.density is None:
                raise InputError(f"--combine {self.kind} needs --density (the fraction of entries kept, in (0, 1])")
            if not (math.isfinite(self.density) and 0.0 < self.density <= 1.0):
                raise InputError(f"--density must be in (0, 1], got {self.density}")
        if self.majority_sign != "total" and self.kind not in ("ties", "dare_ties"):
            raise InputError(f"--majority-sign applies to ties and dare_ties only (no sign is elected in {self.kind})")


# ----------------------------------------------------------------------------- the math

def _stack(tensors: list[torch.Tensor], weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    stacked = torch.stack(tensors, dim=0)  # (n, *shape)
    return stacked, weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its int(density * numel) largest |entries| set to 0 (density >= 1: all kept)."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def random_prune(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the kept ones by 1/density."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def advance_like_peft_injection(generator: torch.Generator, shapes: list[tuple[int, int]], rank: int) -> None:
    """Draw what PEFT 0.21 draws from torch's generator when it injects the new adapter's layers (of
    base weights (out, in), in model order): ``nn.Linear(in, r)`` and ``nn.Linear(r, out)`` fill
    their weights (Kaiming uniform) on construction, then PEFT fills A again (B is zeroed)."""
    for out_features, in_features in shapes:
        for shape in ((rank, in_features), (out_features, rank), (rank, in_features)):
            torch.empty(shape).uniform_(generator=generator)


def disjoint_merge(tensors: list[torch.Tensor], weights: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES: elect a sign per entry from the (pruned, unweighted) tensors, then average the weighted
    entries that agree with it (see the module docstring)."""
    stacked, w = _stack(tensors, weights)
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if majority_sign == "total" else sign.sum(dim=0)
    agree = sign == torch.where(votes >= 0, 1, -1)  # (n, *shape)
    return (stacked * w * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def merge_tensors(tensors: list[torch.Tensor], weights: torch.Tensor, how: Combination,
                  generator: torch.Generator | None) -> torch.Tensor:
    """One factor (all A_i or all B_i of a module) combined per ``how.kind`` (dare: masks from ``generator``)."""
    if how.kind in ("magnitude_prune", "ties"):
        tensors = [magnitude_prune(t, how.density) for t in tensors]
    elif how.kind in ("dare_linear", "dare_ties"):
        tensors = [random_prune(t, how.density, generator) for t in tensors]
    if how.kind in ("ties", "dare_ties"):
        return disjoint_merge(tensors, weights, how.majority_sign)
    stacked, w = _stack(tensors, weights)
    return (stacked * w).sum(dim=0)


def factor_weights(products: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_i, b_i): the weight times scale w_i s_i split as sqrt between A and B, its sign on A."""
    a = [math.sqrt(abs(p)) * (1 if p >= 0 else -1) for p in products]
    b = [math.sqrt(abs(p)) for p in products]
    return torch.tensor(a), torch.tensor(b)


def module_order(name: str) -> tuple:
    """Position of a module in a Llama's ``named_modules()`` (blocks in order, q k v o gate up down
    inside one, lm_head last): the order PEFT visits modules, hence draws its DARE masks in."""
    match = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$", name)
    if match and match[2] in LLAMA_LINEARS:
        return (0, int(match[1]), LLAMA_LINEARS.index(match[2]), name)
    return (1 if name.split(".")[-1] == OUTPUT_HEAD else 2, 0, 0, name)


def combine_weights(sources: list[Source], how: Combination) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"lora_A": A', "lora_B": B'}}`` (fp32) for the union of the sources' modules."""
    modules = sorted({m for s in sources for m in s.weights}, key=module_order)
    if how.kind == "cat":
        return concatenate_weights(sources, how.weights)
    generator = None
    if how.kind.startswith("dare"):
        generator = torch.Generator().manual_seed(how.seed)
        pairs = {m: pair for s in sources for m, pair in s.weights.items()}  # shapes agree (check_same_base)
        shapes = [(int(pairs[m]["lora_B"].shape[0]), int(pairs[m]["lora_A"].shape[1])) for m in modules]
        advance_like_peft_injection(generator, shapes, int(pairs[modules[0]]["lora_A"].shape[0]))
    out = {}
    for module in modules:
        present = [(s, w) for s, w in zip(sources, how.weights) if module in s.weights]
        a_w, b_w = factor_weights([w * s.scale(module) for s, w in present])
        out[module] = {which: merge_tensors([s.weights[module][which].float() for s, _ in present], w, how,
                                            generator)
                       for which, w in (("lora_A", a_w), ("lora_B", b_w))}
    return out


def concatenate_weights(sources: list[Source], weights: list[float]) -> dict[str, dict[str, torch.Tensor]]:
    """``cat``: per module A' = [w_i s_i A_i; ...] and B' = [B_i | ...] over the adapters that adapt
    it, zero-padded to the total rank R (module docstring); fp32."""
    rank = sum(s.largest_rank() for s in sources)
    out = {}
    for module in sorted({m for s in sources for m in s.weights}, key=module_order):
        present = [(s, w) for s, w in zip(sources, weights) if module in s.weights]
        parts_A = torch.cat([w * s.scale(module) * s.weights[module]["lora_A"].float() for s, w in present])
        parts_B = torch.cat([s.weights[module]["lora_B"].float() for s, _ in present], dim=1)
        A = parts_A.new_zeros(rank, parts_A.shape[1])  # (R, in)
        B = parts_B.new_zeros(parts_B.shape[0], rank)  # (out, R)
        A[: parts_A.shape[0]], B[:, : parts_B.shape[1]] = parts_A, parts_B
        out[module] = {"lora_A": A, "lora_B": B}
    return out


# ----------------------------------------------------------------------------- checks and config

def common_rank(sources: list[Source]) -> int:
    """The one rank every module of every source has (PEFT requires it of these types)."""
    ranks = {}
    for s in sources:
        for module, pair in s.weights.items():
            ranks.setdefault(int(pair["lora_A"].shape[0]), (s.path, module))
    if len(ranks) > 1:
        listed = "; ".join(f"r={r} in {path} ({module})" for r, (path, module) in sorted(ranks.items()))
        raise InputError(f"--adapter: every --combine type but cat needs one LoRA rank for all adapters and "
                         f"modules, found {listed} (cat stacks adapters of any ranks)")
    return next(iter(ranks))


def check_same_base(sources: list[Source]) -> None:
    """Same ``base_model_name_or_path`` (where recorded) and, module by module, the same in/out sizes."""
    bases = {s.raw.get("base_model_name_or_path") for s in sources} - {None}
    if len(bases) > 1:
        named = ", ".join(f"{s.path}: {s.raw.get('base_model_name_or_path')}" for s in sources)
        raise InputError(f"--adapter: the adapters were trained on different bases ({named}); only adapters of "
                         "one base can be combined")
    sizes: dict[str, tuple[tuple[int, int], str]] = {}
    for s in sources:
        for module, pair in s.weights.items():
            shape = (int(pair["lora_B"].shape[0]), int(pair["lora_A"].shape[1]))
            seen = sizes.setdefault(module, (shape, s.path))
            if seen[0] != shape:
                raise InputError(f"--adapter {s.path}: {module} adapts a {shape[0]}x{shape[1]} weight, but in "
                                 f"{seen[1]} a {seen[0][0]}x{seen[0][1]} one: the adapters are of different bases")


def _short_targets(s: Source) -> tuple[str, ...] | str:
    """The source's target_modules, "all-linear" resolved to the short names of its modules (PEFT
    turns it into that set when it loads the adapter)."""
    if s.cfg.target_modules == ALL_LINEAR:
        return tuple(sorted({m.split(".")[-1] for m in s.weights}))
    return s.cfg.target_modules


def combined_targets(sources: list[Source]) -> list[str] | str:
    """PEFT's rule: the union of name lists, or the regexes joined as "(t1)|(t2)"; never a mix."""
    targets = [_short_targets(s) for s in sources]
    kinds = {isinstance(t, str) for t in targets}
    if len(kinds) > 1:
        listed = ", ".join(f"{s.path}: {t!r}" for s, t in zip(sources, targets))
        raise InputError(f"--adapter: target_modules mix a regex string and name lists ({listed}); PEFT cannot "
                         "combine those")
    if kinds == {True}:
        return "|".join(f"({t})" for t in targets)
    return sorted(set().union(*targets))


def check_excludes(sources: list[Source]) -> None:
    """The combined adapter takes exclude_modules from the first one: they must agree, else a module
    one adapter trained could be excluded from the result."""
    first = sources[0].cfg.exclude_modules
    for s in sources[1:]:
        if s.cfg.exclude_modules != first:
            raise InputError(f"--adapter {s.path}: exclude_modules {s.cfg.exclude_modules!r} differs from "
                             f"{sources[0].path}'s {first!r}")


def combined_config(sources: list[Source], rank: int) -> dict[str, Any]:
    """``adapter_config.json`` of the result: the first adapter's, with PEFT's replacements."""
    first = sources[0]
    exclude = first.cfg.exclude_modules
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": first.raw.get("base_model_name_or_path"),
        "r": rank, "lora_alpha": rank, "lora_dropout": first.cfg.dropout,
        "target_modules": combined_targets(sources),
        "exclude_modules": list(exclude) if isinstance(exclude, tuple) else exclude,
        "use_rslora": False,  # s' = 1 (see the module docstring: PEFT keeps the first adapter's flag)
        "rank_pattern": {}, "alpha_pattern": {},
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "use_dora": False, "lora_bias": False, "revision": None,
    }


def check_out(out: Path, adapters: list[str], overwrite: bool) -> None:
    """``out`` must not be or hold an input; an existing folder is replaced only with ``overwrite``
    and only when it is an adapter folder (adapter_config.json + adapter_model.safetensors)."""
    for a in adapters:
        if Path(a).exists() and (is_inside(out, Path(a)) or is_inside(Path(a), out)):
            raise InputError(f"--out {out}: is or holds the adapter {a}, which is read; choose another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    if names != {CONFIG_NAME, WEIGHTS_NAME}:
        raise InputError(f"--out {out}: holds other files than an adapter; nothing there is replaced: choose "
                         "another folder")
    if not overwrite:
        raise InputError(f"--out {out}: already holds an adapter (pass --overwrite to replace it)")


def combine_to_folder(adapters: list[str], how: Combination, out: str | os.PathLike,
                      overwrite: bool = False) -> dict[str, Any]:
    """Read and check every adapter, combine (module docstring), write one PEFT adapter at ``out``.
    Everything is checked before anything is written. Returns the written config."""
    out = Path(out)
    if not adapters:
        raise InputError("--combine needs at least one --adapter")
    if len(how.weights) != len(adapters):
        raise InputError(f"--weights: {len(how.weights)} weights for {len(adapters)} adapters; give one per --adapter")
    check_out(out, adapters, overwrite)
    sources = [Source.read(a) for a in adapters]
    check_same_base(sources)
    check_excludes(sources)
    if len(sources) == 1:
        how = Combination("linear", how.weights)  # PEFT's rule for a single adapter
    rank = sum(s.largest_rank() for s in sources) if how.kind == "cat" else common_rank(sources)
    config = combined_config(sources, rank)
    tensors = {f"base_model.model.{m}.{which}.weight": t.contiguous()
               for m, pair in combine_weights(sources, how).items() for which, t in pair.items()}
    record = {"combine": {"type": how.kind, "adapters": [str(Path(a).resolve()) for a in adapters],
                          "weights": how.weights, "density": how.density, "majority_sign": how.majority_sign,
                          "seed": how.seed if how.kind.startswith("dare") else None}}
    write_adapter_folder(out, config, tensors, record)
    return config


def parse_weights(text: str | None) -> list[float]:
    """``--weights 0.6,0.4`` -> [0.6, 0.4]; InputError naming the flag otherwise."""
    if text is None:
        raise InputError("--combine needs --weights: one weight per --adapter, comma-separated (e.g. 0.6,0.4)")
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise InputError(f"--weights must be comma-separated numbers (e.g. 0.6,0.4), got {text!r}") from None


def combine_main(args: Any) -> int:
    """``python -m engine.merge --combine ...`` (the flags of `engine.merge.parse_args`)."""
    if args.out is None:
        raise InputError("--combine needs --out: the folder of the combined adapter")
    if args.seed != 0 and not args.combine.startswith("dare"):
        raise InputError(f"--seed applies to dare_linear and dare_ties only ({args.combine} is deterministic)")
    how = Combination(args.combine, parse_weights(args.weights), args.density, args.majority_sign, args.seed)
    config = combine_to_folder(args.adapter, how, args.out, args.overwrite)
    print(f"combined {len(args.adapter)} adapters ({how.kind}, r={config['r']}, "
          f"{len(config['target_modules']) if isinstance(config['target_modules'], list) else 'regex'} target "
          f"module names); wrote {args.out}")
    return 0
