"""Bottleneck adapters on disk: our own format, since HF PEFT has none for them.

A folder holds the same two files as a PEFT adapter (`engine.adapters.peft_format` writes them):

* ``adapter_config.json``::

      {"peft_type": "BOTTLENECK", "format": "lora-engine-bottleneck", "format_version": 1,
       "task_type": "CAUSAL_LM", "base_model_name_or_path": ..., "hidden_size": H,
       "adapter_dim": d, "placement": "houlsby" | "pfeiffer", "non_linearity": "relu" | ...,
       "dropout": p, "modules": ["model.layers.0.self_attn", "model.layers.0.mlp", ...]}

  ``modules`` lists the wrapped sublayers (every block's, per ``placement``); ``dropout`` is what
  training used (a training choice: ``--init-adapter`` takes it from the flags). A reward model
  (`engine.recipes.reward`) adds ``"task_type": "SEQ_CLS", "modules_to_save": ["score"]``, as PEFT
  spells it for LoRA;
* ``adapter_model.safetensors``: per wrapped sublayer ``<m>`` (fp32)
  ``base_model.model.<m>.adapter_down.weight`` (d, H) = D, ``...adapter_down.bias`` (d,) = b_d,
  ``base_model.model.<m>.adapter_up.weight`` (H, d) = U, ``...adapter_up.bias`` (H,) = b_u;
  a reward model's head (1, H) under ``base_model.model.score.weight`` (`engine.adapters.score_head`);
  our lineage rides in the header under ``lora_engine`` as for LoRA.

Reading checks everything (format and version, fields, keys, shapes, dtypes, finiteness, the
model's hidden size and blocks) before the model is touched; each error is an InputError that
names the file.
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
from engine.adapters.bottleneck import (
    BLOCK_SUBLAYER,
    PLACEMENT_SUBLAYERS,
    BottleneckConfig,
    bottleneck_modules,
    bottleneck_targets,
    inject_bottleneck,
)
from engine.adapters.peft_format import HEAD_KEY, CONFIG_NAME, WEIGHTS_NAME, write_adapter_folder
from engine.adapters.score_head import SCORE, ScoreHead, attach_score_head, score_head
from engine.dtensors import copy_full_into, full_tensor
from engine.errors import InputError

PEFT_TYPE = "BOTTLENECK"
FORMAT = "lora-engine-bottleneck"
FORMAT_VERSION = 1
_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<tensor>adapter_(?:down|up)\.(?:weight|bias))$")
TENSORS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
_REQUIRED = ("format", "format_version", "hidden_size", "adapter_dim", "placement", "non_linearity", "modules")
_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "dropout", "inference_mode", "modules_to_save",
          *_REQUIRED}

Weights = dict[str, dict[str, torch.Tensor]]  # {module: {"adapter_down.weight": ..., ...}}


def expected_shapes(hidden: int, dim: int) -> dict[str, tuple[int, ...]]:
    return {"adapter_down.weight": (dim, hidden), "adapter_down.bias": (dim,),
            "adapter_up.weight": (hidden, dim), "adapter_up.bias": (hidden,)}


# ----------------------------------------------------------------------------- save

def bottleneck_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``base_model.model.<module>.adapter_{down,up}.{weight,bias}`` → fp32 CPU copies (whole:
    under FSDP2 a collective)."""
    def whole(param: torch.Tensor) -> torch.Tensor:
        return full_tensor(param.detach()).float().to("cpu").contiguous().clone()

    tensors = {f"{_PREFIX}{name}.{local}": whole(param) for name, m in bottleneck_modules(model).items()
               for local, param in m.adapter_parameters().items()}
    head = score_head(model)
    if head is not None:
        tensors[HEAD_KEY] = whole(head.weight)
    return tensors


def bottleneck_config_dict(model: nn.Module, cfg: BottleneckConfig,
                           base_model_name_or_path: str | None) -> dict[str, Any]:
    modules = list(bottleneck_modules(model))
    if not modules:
        raise ValueError("save: the model has no bottleneck adapters")
    reward = score_head(model) is not None
    return {"peft_type": PEFT_TYPE, "format": FORMAT, "format_version": FORMAT_VERSION,
            "task_type": "SEQ_CLS" if reward else "CAUSAL_LM", "modules_to_save": [SCORE] if reward else None,
            "base_model_name_or_path": base_model_name_or_path, "hidden_size": model.config.hidden_size,
            "adapter_dim": cfg.adapter_dim, "placement": cfg.placement, "non_linearity": cfg.non_linearity,
            "dropout": cfg.dropout, "inference_mode": True, "modules": modules}


def save_bottleneck(model: nn.Module, cfg: BottleneckConfig, out_dir: str | os.PathLike,
                    base_model_name_or_path: str | None, metadata: dict[str, Any] | None = None,
                    tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the folder atomically (`engine.adapters.peft_format.write_adapter_folder`)."""
    config = bottleneck_config_dict(model, cfg, base_model_name_or_path)
    return write_adapter_folder(out_dir, config, bottleneck_state_dict(model) if tensors is None else tensors,
                                metadata)


# ----------------------------------------------------------------------------- read

def read_bottleneck_config(adapter_dir: str | os.PathLike) -> tuple[BottleneckConfig, dict[str, Any]]:
    """The folder's `BottleneckConfig` and its whole JSON object; InputError naming the file for a
    wrong type, format, version or field."""
    path, raw = read_config_json(adapter_dir)
    if raw.get("peft_type") != PEFT_TYPE:
        raise InputError(f"{path}: peft_type is {raw.get('peft_type')!r}, expected {PEFT_TYPE!r}")
    if raw.get("format") != FORMAT:
        raise InputError(f"{path}: format is {raw.get('format')!r}, expected {FORMAT!r}")
    version = raw.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InputError(f"{path}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise InputError(f"{path}: format_version {version} is newer than this engine reads ({FORMAT_VERSION}); "
                         "update the engine")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise InputError(f"{path}: missing required field {missing[0]!r} (a {FORMAT} folder has "
                         f"{', '.join(_REQUIRED)})")
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise InputError(f"{path}: unknown field {unknown[0]!r} for {FORMAT} version {FORMAT_VERSION}")
    hidden = raw["hidden_size"]
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise InputError(f"{path}: hidden_size {hidden!r} is not a positive integer")
    if raw.get("modules_to_save") not in (None, [], [SCORE]) or (
            bool(raw.get("modules_to_save")) != (raw.get("task_type") == "SEQ_CLS")):
        raise InputError(f"{path}: task_type {raw.get('task_type')!r} with modules_to_save "
                         f"{raw.get('modules_to_save')!r}: expected CAUSAL_LM without, or a reward model's SEQ_CLS "
                         f"with [{SCORE!r}]")
    modules = raw["modules"]
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise InputError(f"{path}: modules must be a non-empty list of module names, got {modules!r}")
    try:
        cfg = BottleneckConfig(adapter_dim=raw["adapter_dim"], placement=raw["placement"],
                               non_linearity=raw["non_linearity"], dropout=raw.get("dropout", 0.0))
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    kinds = PLACEMENT_SUBLAYERS[cfg.placement]
    stray = [m for m in modules if not ((match := BLOCK_SUBLAYER.fullmatch(m)) and match[1] in kinds)]
    if stray:
        raise InputError(f"{path}: module {stray[0]!r} is not a sublayer that placement {cfg.placement!r} wraps "
                         f"(model.layers.N.{'|'.join(kinds)})")
    return cfg, raw


def read_bottleneck_weights(adapter_dir: str | os.PathLike) -> tuple[Weights, torch.Tensor | None]:
    """``{module: {tensor: value}}`` from the safetensors file, and a reward model's head (or None);
    every module has its four float, finite tensors, each key is one of ours. Shapes are checked
    against a model by `check_fits`."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise InputError(f"{path}: not found")
    weights: Weights = {}
    head = None
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key == HEAD_KEY:
                    head = f.get_tensor(key)
                    continue
                match = _KEY_RE.match(key.removeprefix(_PREFIX)) if key.startswith(_PREFIX) else None
                if match is None:
                    raise InputError(f"{path}: tensor {key!r} is not a bottleneck adapter weight (expected "
                                     f"{_PREFIX}<module>.adapter_down|adapter_up.weight|bias)")
                weights.setdefault(match["module"], {})[match["tensor"]] = f.get_tensor(key)
    except InputError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt headers/files
        raise InputError(f"{path}: cannot read safetensors file ({err})") from None
    for module, tensors in weights.items():
        for name in TENSORS:
            if name not in tensors:
                raise InputError(f"{path}: {_PREFIX}{module}.{name} is missing")
            tensor = tensors[name]
            if not tensor.is_floating_point():
                raise InputError(f"{path}: {_PREFIX}{module}.{name} has dtype {tensor.dtype}, expected floats")
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise InputError(f"{path}: {_PREFIX}{module}.{name} has {bad} non-finite values (NaN or inf): the "
                                 "adapter is broken (was its run diverging?)")
    if head is not None and not (head.is_floating_point() and bool(torch.isfinite(head).all())):
        raise InputError(f"{path}: {HEAD_KEY} is not a finite float tensor")
    return weights, head


def check_fits(model: nn.Module, adapter_dir: str | os.PathLike, cfg: BottleneckConfig, raw: dict[str, Any],
               weights: Weights, head: torch.Tensor | None, targets: list[str]) -> None:
    """The folder against a model whose sublayers ``targets`` it is to wrap: hidden size, the
    listed modules, the weights' modules, every shape, and a reward head as the config says."""
    config_path, weights_path = Path(adapter_dir) / CONFIG_NAME, Path(adapter_dir) / WEIGHTS_NAME
    hidden = model.config.hidden_size
    if raw["hidden_size"] != hidden:
        raise InputError(f"{config_path}: hidden_size {raw['hidden_size']} does not match the model's {hidden} "
                         "(an adapter of another base model?)")
    if raw["modules"] != targets:
        diff = sorted(set(raw["modules"]) ^ set(targets)) or ["(their order)"]
        raise InputError(f"{config_path}: modules differ from the {cfg.placement} sublayers of this model "
                         f"({len(targets)} expected; e.g. {diff[0]!r}): an adapter of another base model?")
    if set(weights) != set(targets):
        diff = sorted(set(weights) ^ set(targets))
        raise InputError(f"{weights_path}: its modules differ from the {len(targets)} listed in {CONFIG_NAME} "
                         f"(e.g. {diff[0]!r})")
    shapes = expected_shapes(hidden, cfg.adapter_dim)
    for module in targets:
        for name, shape in shapes.items():
            got = tuple(weights[module][name].shape)
            if got != shape:
                raise InputError(f"{weights_path}: {_PREFIX}{module}.{name} has shape {got}, expected {shape} "
                                 f"(adapter_dim {cfg.adapter_dim}, hidden {hidden})")
    if (head is not None) != bool(raw.get("modules_to_save")):
        raise InputError(f"{weights_path}: {'holds a' if head is not None else 'has no'} reward head ({HEAD_KEY}), "
                         f"{CONFIG_NAME} {'does not list' if head is not None else 'lists'} it in modules_to_save")
    if head is not None and tuple(head.shape) != (1, hidden):
        raise InputError(f"{weights_path}: {HEAD_KEY} has shape {tuple(head.shape)}, expected (1, {hidden})")


@torch.no_grad()
def assign_bottleneck_weights(model: nn.Module, weights: Weights) -> None:
    """Copy checked ``weights`` into the model's adapters (cast to their fp32; FSDP2: this rank's shard)."""
    for name, m in bottleneck_modules(model).items():
        for local, param in m.adapter_parameters().items():
            copy_full_into(param, weights[name][local])


def load_bottleneck(model: nn.Module, adapter_dir: str | os.PathLike) -> BottleneckConfig:
    """Check the folder against ``model`` (without adapters; a meta-device model will do), then
    wrap its sublayers and assign the weights. Returns the config."""
    cfg, raw = read_bottleneck_config(adapter_dir)
    weights, head = read_bottleneck_weights(adapter_dir)
    try:
        targets = bottleneck_targets(model, cfg.placement)
    except InputError as err:
        raise InputError(f"{Path(adapter_dir) / CONFIG_NAME}: {err}") from None
    check_fits(model, adapter_dir, cfg, raw, weights, head, targets)
    inject_bottleneck(model, cfg)
    assign_bottleneck_weights(model, weights)
    if head is not None:
        attach_score_head(model, ScoreHead(head).to(model.model.embed_tokens.weight.device))
    return cfg


def load_bottleneck_weights(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Copy a folder's weights into a model that already has the same bottleneck adapters (resume)."""
    cfg, raw = read_bottleneck_config(adapter_dir)
    weights, head = read_bottleneck_weights(adapter_dir)
    modules = bottleneck_modules(model)
    config_path = Path(adapter_dir) / CONFIG_NAME
    if not modules:
        raise InputError(f"{config_path}: the model has no bottleneck adapters to load these weights into")
    first = next(iter(modules.values()))
    if (first.adapter_dim, first.non_linearity) != (cfg.adapter_dim, cfg.non_linearity):
        raise InputError(f"{config_path}: adapter_dim {cfg.adapter_dim}, non_linearity {cfg.non_linearity!r}; the "
                         f"model's adapters have {first.adapter_dim}, {first.non_linearity!r}")
    check_fits(model, adapter_dir, cfg, raw, weights, head, list(modules))
    model_head = score_head(model)
    if (model_head is None) != (head is None):
        raise InputError(f"{Path(adapter_dir) / WEIGHTS_NAME}: {'has no' if head is None else 'has a'} reward head "
                         f"({HEAD_KEY}), the model {'has one' if model_head is not None else 'has none'}")
    assign_bottleneck_weights(model, weights)
    if head is not None:
        copy_full_into(model_head.weight, head)
