"""Which linears get a LoRA, and the helpers that act on every `LoRALinear` of a model.

`inject_lora` swaps the targeted ``nn.Linear`` (or `QuantizedLinear`, for a quantized base) modules of a model for
`LoRALinear`s that own them; nothing is patched. Module names follow HF's tree
(``model.layers.0.self_attn.q_proj``), so the target rules are PEFT's:

* ``target_modules = "all-linear"``: every linear layer except the output head ``lm_head``;
* a list of names: a module matches when its full name equals an entry or ends in ``.entry``;
* any other string: a regular expression that must match the full module name (``re.fullmatch``);
* ``exclude_modules`` removes matches by the same rules.

`remove_lora` is the way back (each LoRALinear replaced by the base it owns). `adapter_params`,
`set_trainable`, `disable_adapters` (DPO's reference policy is the base with adapters off) and
`remove_adapters` act on every method's adapter modules (`engine.adapters.base`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from torch import nn

from engine.adapters.base import adapter_modules
from engine.adapters.lora import ALL_LINEAR, OUTPUT_HEAD, LoRAConfig, LoRALinear
from engine.adapters.score_head import SCORE, score_head
from engine.errors import InputError
from models.quantized import QuantizedLinear


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantizedLinear))


def _is_excluded(cfg: LoRAConfig, name: str) -> bool:
    ex = cfg.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, name) is not None
    return any(name == e or name.endswith("." + e) for e in ex)


def find_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Names of the modules `inject_lora` would replace, in model order; nothing is changed.

    Raises InputError when a target matches no module, matches a module that is not a linear
    layer, or selects the output head (its weight is read directly by the fused loss).
    """
    modules = dict(model.named_modules())
    if any(isinstance(m, LoRALinear) for m in modules.values()):
        raise InputError("the model already has LoRA adapters; load or inject only once")
    tm = cfg.target_modules
    if tm == ALL_LINEAR:
        names = [n for n, m in modules.items() if _is_linear(m) and n.split(".")[-1] != OUTPUT_HEAD]
        if not names:
            raise InputError("target_modules='all-linear' matched no linear layer in the model")
    elif isinstance(tm, str):
        names = [n for n in modules if n and re.fullmatch(tm, n)]
        if not names:
            raise InputError(f"target_modules regex {tm!r} matches no module name (it must match the whole "
                             f"name, e.g. 'model.layers.0.self_attn.q_proj')")
    else:
        names = [n for n in modules if n and any(n == t or n.endswith("." + t) for t in tm)]
        for target in tm:
            if not any(n == target or n.endswith("." + target) for n in names):
                available = sorted({n.split(".")[-1] for n, m in modules.items() if _is_linear(m)})
                raise InputError(f"LoRA target module {target!r} matches no module in the model; "
                                 f"linear layers are named {', '.join(available)}")
    names = [n for n in names if not _is_excluded(cfg, n)]
    for n in names:
        if n.split(".")[-1] == OUTPUT_HEAD:
            raise InputError(f"LoRA on the output head {n!r} is not supported (the loss reads its weight directly)")
        if not _is_linear(modules[n]):
            raise InputError(f"LoRA target {n!r} is a {type(modules[n]).__name__}, not a linear layer")
    if not names:
        raise InputError("every LoRA target module is excluded by exclude_modules")
    return names


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the one named ``name``, in the same train/eval mode."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module.train(getattr(parent, child).training))


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace each target linear by a `LoRALinear` owning it; return the replaced names.

    Uses the global torch RNG for A's initialisation (seed it for reproducible runs). Freezes
    nothing else: call `set_trainable` to make the LoRA weights the only trainable ones.
    """
    names = find_targets(model, cfg)
    for name in names:
        base = model.get_submodule(name)
        r, alpha = cfg.rank_for(name), cfg.alpha_for(name)
        replace_module(model, name, LoRALinear(base, r, alpha, cfg.dropout, cfg.use_rslora))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` of the model by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters by name, whatever the method (`engine.adapters.base.AdapterModule`:
    LoRA's ``<module>.lora_A`` / ``<module>.lora_B``, DoRA's magnitude, IA³'s scales...), in model
    order, then a reward model's head (``score.weight``, `engine.adapters.score_head`) when the
    model has one: what trains, what is saved, what must stay finite."""
    params: dict[str, nn.Parameter] = {}
    for name, m in adapter_modules(model).items():
        for local, param in m.adapter_parameters().items():
            params[f"{name}.{local}"] = param
    head = score_head(model)
    if head is not None:
        params[f"{SCORE}.weight"] = head.weight
    return params


def set_trainable(model: nn.Module) -> int:
    """Freeze everything but the adapter (and a reward model's head); return the number of
    trainable elements."""
    if not adapter_modules(model):
        raise ValueError("set_trainable: the model has no adapters (inject one first)")
    trainable = {id(p) for p in adapter_params(model).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block every adapter module computes what its base alone computes (DPO's
    reference model)."""
    modules = list(adapter_modules(model).values())
    if not modules:
        raise ValueError("disable_adapters: the model has no adapters")
    previous = [m.adapter_enabled for m in modules]
    for m in modules:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m, was in zip(modules, previous):
            m.adapter_enabled = was


def remove_adapters(model: nn.Module) -> None:
    """Take every adapter module out: each replaced module put back, each attached one deleted."""
    for name, module in adapter_modules(model).items():
        original = module.unwrapped()
        if original is None:
            parent_name, _, child = name.rpartition(".")
            delattr(model.get_submodule(parent_name) if parent_name else model, child)
        else:
            replace_module(model, name, original)


def remove_lora(model: nn.Module) -> None:
    """Put every LoRALinear's own base linear back in its place (the plain base model)."""
    for name, module in lora_modules(model).items():
        replace_module(model, name, module.base)
