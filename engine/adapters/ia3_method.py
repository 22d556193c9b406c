"""IA³ as an `engine.adapters.methods.AdapterMethod`, in HF PEFT's folder format both ways.

A folder holds

* ``adapter_config.json``: PEFT 0.21's ``IA3Config`` fields (``peft_type`` "IA3", ``target_modules``,
  ``feedforward_modules``, ``exclude_modules``, ``fan_in_fan_out``, ``init_ia3_weights``,
  ``modules_to_save``...), so ``PeftModel.from_pretrained`` loads it;
* ``adapter_model.safetensors``: ``base_model.model.<module>.ia3_l`` per adapted module, PEFT's
  shapes: (out, 1) for an output scale, (1, in) for a feed-forward (input) scale. We read PEFT's
  other spellings too (``.ia3_l.default``, no ``base_model.model.`` prefix).

A config without ``target_modules`` / ``feedforward_modules`` gets PEFT's Llama defaults, as PEFT
itself fills them in for a Llama. Everything (config, every key, shape and value) is checked
before the model is touched; errors are InputErrors naming the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from engine.adapters.config_file import read_config_json
from engine.adapters.ia3 import (
    LLAMA_IA3_FEEDFORWARD,
    LLAMA_IA3_TARGETS,
    IA3Config,
    IA3Linear,
    find_ia3_targets,
    ia3_config_from_flags,
    ia3_modules,
    inject_ia3,
)
from engine.adapters.methods import AdapterMethod, register
from engine.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, write_adapter_folder
from engine.dtensors import copy_full_into, full_tensor
from engine.errors import InputError

PEFT_TYPE = "IA3"
_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.ia3_l(?:\.default)?$")


def _names(value: tuple[str, ...] | str | None) -> list[str] | str | None:
    return sorted(value) if isinstance(value, tuple) else value


def ia3_config_dict(cfg: IA3Config, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` contents (PEFT 0.21's IA3Config fields)."""
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": _names(cfg.target_modules),
        "feedforward_modules": _names(cfg.feedforward_modules),
        "exclude_modules": _names(cfg.exclude_modules),
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "auto_mapping": None,
        "revision": None,
    }


def peft_shape(module: IA3Linear) -> tuple[int, int]:
    """PEFT's shape of ``ia3_l``: (1, in) for a feed-forward module, else (out, 1)."""
    return (1, module.in_features) if module.feedforward else (module.out_features, 1)


def ia3_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-keyed fp32 CPU copies of every l, in PEFT's shapes (whole: under FSDP2 a collective)."""
    modules = ia3_modules(model)
    if not modules:
        raise ValueError("save: the model has no IA³ adapters")
    return {f"{_PREFIX}{name}.ia3_l": full_tensor(m.ia3_l.detach()).to("cpu").reshape(peft_shape(m)).clone()
            for name, m in modules.items()}


def read_ia3_config(adapter_dir: str | os.PathLike) -> IA3Config:
    """The folder's IA3Config; InputError naming the file for anything we do not implement."""
    path, raw = read_config_json(adapter_dir)
    if raw.get("peft_type") != PEFT_TYPE:
        raise InputError(f"{path}: peft_type is {raw.get('peft_type')!r}, not {PEFT_TYPE!r}")
    if raw.get("fan_in_fan_out"):
        raise InputError(f"{path}: fan_in_fan_out=true is not supported (Llama's linears store (out, in))")
    if raw.get("modules_to_save"):
        raise InputError(f"{path}: modules_to_save={raw['modules_to_save']!r} is not supported (IA³ vectors only)")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise InputError(f"{path}: task_type {raw['task_type']!r} is not supported (a causal-LM adapter)")
    for key in ("target_modules", "feedforward_modules", "exclude_modules"):
        value = raw.get(key)
        if value is not None and not (isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise InputError(f"{path}: {key} must be a list of module names or a regex string, got {value!r}")
    targets = raw.get("target_modules")
    try:
        return IA3Config(target_modules=LLAMA_IA3_TARGETS if targets is None else targets,
                         feedforward_modules=LLAMA_IA3_FEEDFORWARD if raw.get("feedforward_modules") is None
                         else raw["feedforward_modules"],
                         exclude_modules=raw.get("exclude_modules"))
    except InputError as err:
        raise InputError(f"{path}: {err}") from None


def read_ia3_weights(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{module name: l}`` (as stored: 2-D) from the safetensors file, any PEFT key spelling;
    InputError for another tensor, a non-float, non-2-D or non-finite one."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise InputError(f"{path}: not found")
    weights: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                match = _KEY_RE.match(key.removeprefix(_PREFIX))
                if match is None:
                    raise InputError(f"{path}: tensor {key!r} is not an IA³ vector (<module>.ia3_l)")
                if match["module"] in weights:
                    raise InputError(f"{path}: two tensors for {match['module']}.ia3_l")
                weights[match["module"]] = f.get_tensor(key)
    except InputError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt headers/files
        raise InputError(f"{path}: cannot read safetensors file ({err})") from None
    if not weights:
        raise InputError(f"{path}: holds no IA³ vectors")
    for module, tensor in weights.items():
        if not tensor.is_floating_point() or tensor.dim() != 2:
            raise InputError(f"{path}: {module}.ia3_l has shape {tuple(tensor.shape)} and dtype {tensor.dtype}; "
                             "expected a 2-D float tensor ((out, 1) or (1, in))")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise InputError(f"{path}: {module}.ia3_l has {bad} non-finite values (NaN or inf): the adapter is "
                             "broken (was its run diverging?)")
    return weights


def _check_against(path: Path, expected: dict[str, tuple[int, int]], weights: dict[str, torch.Tensor]) -> None:
    """The file's vectors are exactly the modules ``expected`` ({name: PEFT shape}), in those shapes."""
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise InputError(f"{path}: a vector for {unknown[0]!r}, which the adapter config does not target or the "
                         f"model does not have ({len(unknown)} such modules)")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise InputError(f"{path}: no vector for targeted module {missing[0]!r} ({len(missing)} missing)")
    for name, shape in expected.items():
        got = tuple(weights[name].shape)
        if got != shape:
            kind = "feed-forward: scales the input" if shape[0] == 1 else "scales the output"
            raise InputError(f"{path}: {_PREFIX}{name}.ia3_l has shape {got}, expected {shape} ({kind})")


def load_ia3(model: nn.Module, adapter_dir: str | os.PathLike) -> IA3Config:
    """Check the folder against ``model`` (a meta-device one will do), then inject and assign."""
    cfg = read_ia3_config(adapter_dir)
    weights = read_ia3_weights(adapter_dir)
    try:
        targets = find_ia3_targets(model, cfg)
    except InputError as err:
        raise InputError(f"{Path(adapter_dir) / CONFIG_NAME}: {err}") from None
    expected = {}
    for name in targets:
        base = model.get_submodule(name)
        expected[name] = (1, base.in_features) if cfg.is_feedforward(name) else (base.out_features, 1)
    _check_against(Path(adapter_dir) / WEIGHTS_NAME, expected, weights)
    inject_ia3(model, cfg)
    _assign(model, weights)
    return cfg


def load_ia3_weights(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Copy a folder's vectors into a model that already has the same IA³ modules (resume)."""
    weights = read_ia3_weights(adapter_dir)
    _check_against(Path(adapter_dir) / WEIGHTS_NAME, {n: peft_shape(m) for n, m in ia3_modules(model).items()},
                   weights)
    _assign(model, weights)


@torch.no_grad()
def _assign(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    modules = ia3_modules(model)
    for name, tensor in weights.items():
        copy_full_into(modules[name].ia3_l, tensor.reshape(-1))  # plain, or this rank's FSDP2 shard


class IA3Method(AdapterMethod):
    name = "ia3"

    def config_from_flags(self, flags: Any) -> IA3Config:
        return ia3_config_from_flags(flags)

    def inject(self, model: nn.Module, config: IA3Config) -> list[str]:
        return inject_ia3(model, config)

    def claims(self, raw: dict[str, Any]) -> bool:
        return raw.get("peft_type") == PEFT_TYPE

    def save(self, model: nn.Module, config: IA3Config, out_dir: str | os.PathLike,
             base_model_name_or_path: str | None, metadata: dict[str, Any] | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> Path:
        return write_adapter_folder(out_dir, ia3_config_dict(config, base_model_name_or_path),
                                    ia3_state_dict(model) if tensors is None else tensors, metadata)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return ia3_state_dict(model)

    def read_config(self, adapter_dir: str | os.PathLike) -> IA3Config:
        return read_ia3_config(adapter_dir)

    def load(self, model: nn.Module, adapter_dir: str | os.PathLike) -> IA3Config:
        return load_ia3(model, adapter_dir)

    def load_weights(self, model: nn.Module, adapter_dir: str | os.PathLike) -> None:
        load_ia3_weights(model, adapter_dir)


IA3 = register(IA3Method())
