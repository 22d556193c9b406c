"""Adapters on a frozen base: LoRA modules and their configuration, which linears they go on,
merging, the PEFT folder format both ways, several adapters over one base, and a reward model's
scalar head (`engine.adapters.score_head`).

    from engine.adapters import LoRAConfig, inject_lora, set_trainable, save_adapter, load_adapter
"""

from engine.adapters.lora import ALL_LINEAR, LoRAConfig, LoRALinear, lora_scale
from engine.adapters.merge import MergeReport, merge
from engine.adapters.multi import MultiAdapters, MultiLoRALinear, inject_adapters
from engine.adapters.peft_format import (
    adapter_targets,
    assign_adapter_weights,
    load_adapted_model,
    load_adapter,
    load_adapter_weights,
    read_adapter_config,
    read_adapter_metadata,
    read_adapter_weights,
    read_head_weight,
    save_adapter,
)
from engine.adapters.score_head import ScoreHead, attach_score_head, new_score_head, score_head
from engine.adapters.switcher import (
    Adapter,
    AdapterSwitcher,
    check_adapter_fits,
    read_adapter,
)
from engine.adapters.targets import (
    adapter_params,
    disable_adapters,
    find_targets,
    inject_lora,
    lora_modules,
    remove_lora,
    set_trainable,
)

__all__ = [
    "ALL_LINEAR", "Adapter", "AdapterSwitcher", "LoRAConfig", "LoRALinear", "MergeReport", "MultiAdapters",
    "MultiLoRALinear", "adapter_params", "adapter_targets", "assign_adapter_weights", "check_adapter_fits",
    "disable_adapters", "find_targets", "inject_adapters", "inject_lora", "load_adapted_model", "load_adapter",
    "load_adapter_weights", "lora_modules", "lora_scale", "merge", "read_adapter", "read_adapter_config",
    "read_adapter_metadata", "read_adapter_weights", "read_head_weight", "remove_lora", "save_adapter",
    "set_trainable", "ScoreHead", "attach_score_head", "new_score_head", "score_head",
]
