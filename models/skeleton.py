"""A model's module tree on the meta device, built without running any weight initialiser.

Loading and the pre-flight checks of a run need the module tree (names, shapes, dtypes) before any
weight exists; every weight is then replaced by a checkpoint tensor. Building under
``torch.device("meta")`` alone still runs each module's ``reset_parameters``: on meta tensors the
``nn.init`` functions do no arithmetic, but ``normal_`` and ``kaiming_uniform_`` run torch's Python
references of those ops, about half of the 0.16 s that building SmolLM2-135M's tree takes on a CPU.
`meta_model` builds the tree under a `TorchFunctionMode` (PyTorch's public hook for intercepting
torch functions; nothing is patched) in which the ``torch.nn.init`` functions that dispatch to
such modes (``uniform_``, ``normal_``, ``kaiming_uniform_``, ``trunc_normal_``...) return their
tensor untouched; the others (``zeros_``, ``ones_``) are one in-place call, a no-op on meta.

The RoPE buffer is computed on the CPU and moved to meta (`models.llama.rope_inv_freq`): divided on
meta, it went through the same Python references, whose first call imports ``torch._dynamo``.
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
