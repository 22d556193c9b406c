"""A model's module tree on the meta device, built without running any weight initialiser.

Loading and the pre-flight checks of a run need the module tree (names, shapes, dtypes) before any
weight exists; every weight is then replaced by a checkpoint tensor. Building under
``torch.device("meta")`` alone still runs each module's ``reset_parameters``: on meta tensors the
``nn.init`` functions do no arithmetic, but ``init.normal_`` goes through torch's Python reference
of ``normal_``, whose first call imports ``torch._dynamo`` (about 3 s of a fresh process on a CPU,
most of a small model's load). `meta_model` builds the tree under a `TorchFunctionMode` (PyTorch's
public hook for intercepting torch functions; nothing is patched) in which every ``torch.nn.init``
function returns its tensor untouched, so an initialiser costs one Python call.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from models.config import LlamaConfig
from models.llama import LlamaForCausalLM


class _SkipInit(TorchFunctionMode):
    """Inside: ``torch.nn.init.<fn>(tensor, ...)`` returns ``tensor`` unchanged; all else runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def meta_model(cfg: LlamaConfig) -> LlamaForCausalLM:
    """`LlamaForCausalLM` of ``cfg`` with every parameter and buffer on meta (no memory, no init):
    the same names, shapes and dtypes (fp32) as ``LlamaForCausalLM(cfg)`` built on meta."""
    with torch.device("meta"), _SkipInit():
        return LlamaForCausalLM(cfg)
