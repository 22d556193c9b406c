"""One way in: the parameter-efficient methods (``--peft``) and the dispatch on them, in one place.

Each method is an `AdapterMethod` registered in `METHODS` under its ``--peft`` name. A run, merge,
eval or generation never branches on the method: it calls the functions at the end of this file
(`config_from_flags`, `inject_adapter`, `save_adapter`, `load_adapter`, `load_adapter_weights`,
`adapter_state_dict`, `read_config`), which find the method from the adapter configuration
(``config.method``) or from the folder's ``adapter_config.json`` (`AdapterMethod.claims`), and the
method-blind module helpers of `engine.adapters.targets` and `engine.adapters.merge`.

A method's configuration is a dataclass with a ``method`` attribute (its ``--peft`` name) and a
``dropout`` attribute (0 where the method has none); `engine.adapters.lora.LoRAConfig` is LoRA's
and DoRA's (``use_dora``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.adapters.config_file import read_config_json
from engine.errors import InputError
from models import load_model, resolve_model_dir
from models.loading import read_config as read_model_config


class AdapterMethod(ABC):
    """A parameter-efficient method: its configuration from the flags, injection, and its folder."""

    name: str  # the --peft value, and the configuration's ``method``
    mergeable: bool = True

    @abstractmethod
    def config_from_flags(self, flags: Any) -> Any:
        """This method's adapter configuration from a `engine.config.TrainConfig`."""

    def check_fits(self, skeleton: nn.Module, config: Any) -> None:
        """InputError (naming the flag) when ``config`` does not fit the model; ``skeleton`` is a
        meta-device model without adapters. Default: injecting into it succeeds."""
        self.inject(skeleton, config)

    @abstractmethod
    def inject(self, model: nn.Module, config: Any) -> list[str]:
        """Add fresh adapter modules (the global torch RNG draws random initialisations); return
        the names of the modules added or replaced."""

    @abstractmethod
    def claims(self, raw: dict[str, Any]) -> bool:
        """Whether a folder's ``adapter_config.json`` contents are this method's."""

    @abstractmethod
    def save(self, model: nn.Module, config: Any, out_dir: str | os.PathLike, base_model_name_or_path: str | None,
             metadata: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the adapter folder atomically (``tensors``: `state_dict` gathered by the caller)."""

    @abstractmethod
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors `save` writes, keyed as in the folder (whole, fp32, on the CPU; under FSDP2
        a collective)."""

    @abstractmethod
    def read_config(self, adapter_dir: str | os.PathLike) -> Any:
        """The folder's configuration; InputError naming the file for anything not supported."""

    @abstractmethod
    def load(self, model: nn.Module, adapter_dir: str | os.PathLike) -> Any:
        """Check the folder against ``model``, then inject and assign its weights; return its config."""

    @abstractmethod
    def load_weights(self, model: nn.Module, adapter_dir: str | os.PathLike) -> None:
        """Copy a folder's weights into a model that already has this method's adapters (resume)."""


METHODS: dict[str, AdapterMethod] = {}


def register(method: AdapterMethod) -> AdapterMethod:
    METHODS[method.name] = method
    return method


def _methods() -> dict[str, AdapterMethod]:
    """Every registered method, in `engine.adapters.method_registry.ORDER`."""
    from engine.adapters.method_registry import ORDER  # importing it registers every method
    rank = {name: i for i, name in enumerate(ORDER)}
    return {name: METHODS[name] for name in sorted(METHODS, key=lambda n: rank.get(n, len(ORDER)))}


def method_named(name: str) -> AdapterMethod:
    methods = _methods()
    if name not in methods:
        raise InputError(f"--peft {name!r}: expected one of {', '.join(methods)}")
    return methods[name]


def method_of(config: Any) -> AdapterMethod:
    return method_named(config.method)


def folder_method(adapter_dir: str | os.PathLike) -> AdapterMethod:
    """The method whose folder ``adapter_dir`` is, from its ``adapter_config.json``."""
    path, raw = read_config_json(adapter_dir)
    for method in _methods().values():
        if method.claims(raw):
            return method
    raise InputError(f"{path}: peft_type {raw.get('peft_type')!r} is not a method we train or load "
                     f"(--peft {'|'.join(_methods())})")


def check_fits(model_config: Any, adapter_dir: str | os.PathLike, merging: bool = False) -> AdapterMethod:
    """The folder's method, after its adapter was loaded onto a meta-device model of
    ``model_config`` (every check the method makes; no weight is read); with ``merging`` an
    InputError when the method cannot be folded into weights."""
    from models.skeleton import meta_model
    method = folder_method(adapter_dir)
    if merging and not method.mergeable:
        raise InputError(f"--adapter {adapter_dir}: a {method.name} adapter is not mergeable: it adds computation "
                         "that is not a change of weights, so it cannot be merged into the base; serve the base with "
                         "the adapter folder (engine.adapters.load_adapted_model, engine.generate --adapter DIR)")
    method.load(meta_model(model_config), adapter_dir)
    return method


# ----------------------------------------------------------------------------- the dispatch

def config_from_flags(flags: Any) -> Any:
    """The adapter configuration a fresh run trains (``flags.peft``: the method)."""
    return method_named(flags.peft).config_from_flags(flags)


def inject_adapter(model: nn.Module, config: Any) -> list[str]:
    return method_of(config).inject(model, config)


def read_config(adapter_dir: str | os.PathLike) -> Any:
    return folder_method(adapter_dir).read_config(adapter_dir)


def save_adapter(model: nn.Module, config: Any, out_dir: str | os.PathLike, base_model_name_or_path: str | None,
                 metadata: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapter as a folder (PEFT's format where PEFT has one), atomically."""
    return method_of(config).save(model, config, out_dir, base_model_name_or_path, metadata, tensors)


def adapter_state_dict(model: nn.Module, config: Any) -> dict[str, torch.Tensor]:
    return method_of(config).state_dict(model)


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> Any:
    """Inject and load the folder's adapter, whatever its method; return its configuration."""
    return folder_method(adapter_dir).load(model, adapter_dir)


def load_adapter_weights(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    folder_method(adapter_dir).load_weights(model, adapter_dir)


def load_adapted_model(name_or_path: str | os.PathLike, adapter: str | os.PathLike | None = None, *,
                       quantize: str | None = None, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> nn.Module:
    """`models.load_model` with the ``adapter`` folder of any method on top (none: the plain base), in
    eval mode; the adapter is checked against the model's shapes before a weight is read."""
    if adapter is not None:
        check_fits(read_model_config(resolve_model_dir(name_or_path)), adapter)
    model = load_model(name_or_path, quantize=quantize, dtype=dtype, device=device)
    if adapter is not None:
        load_adapter(model, adapter)
    return model.eval()
