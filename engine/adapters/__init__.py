"""Adapters on a frozen base: the parameter-efficient methods (``--peft``: `engine.adapters.methods`
dispatches on them in one place), LoRA modules and their configuration, which linears they go on,
merging, the PEFT folder format both ways, several adapters over one base, and a reward model's
scalar head (`engine.adapters.score_head`).

    from engine.adapters import LoRAConfig, inject_adapter, set_trainable, save_adapter, load_adapter
"""

from engine.adapters.base import AdapterModule, NotMergeable, adapter_modules
from engine.adapters.lora import ALL_LINEAR, LoRAConfig, LoRALinear, lora_scale
from engine.adapters.merge import MergeReport, merge
from engine.adapters.multi import MultiAdapters, MultiLoRALinear, inject_adapters
from engine.adapters.methods import (
    METHODS,
    AdapterMethod,
    adapter_state_dict,
    config_from_flags,
    folder_method,
    inject_adapter,
    load_adapted_model,
    load_adapter,
    load_adapter_weights,
    method_named,
    method_of,
    read_config,
    save_adapter,
)
from engine.adapters.peft_format import (
    adapter_targets,
    assign_adapter_weights,
    read_adapter_config,
    read_adapter_metadata,
    read_adapter_weights,
    read_head_weight,
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
    remove_adapters,
    remove_lora,
    set_trainable,
)

__all__ = [
    "ALL_LINEAR", "Adapter", "AdapterMethod", "AdapterModule", "AdapterSwitcher", "LoRAConfig", "LoRALinear", "METHODS",
    "MergeReport", "MultiAdapters", "MultiLoRALinear", "NotMergeable", "adapter_modules", "adapter_params",
    "adapter_state_dict", "adapter_targets", "assign_adapter_weights", "check_adapter_fits", "config_from_flags",
    "disable_adapters", "find_targets", "folder_method", "inject_adapter", "inject_adapters", "inject_lora",
    "load_adapted_model", "load_adapter", "load_adapter_weights", "lora_modules", "lora_scale", "merge",
    "method_named", "method_of", "read_adapter", "read_adapter_config", "read_adapter_metadata",
    "read_adapter_weights", "read_config", "read_head_weight", "remove_adapters", "remove_lora", "save_adapter",
    "set_trainable", "ScoreHead", "attach_score_head", "new_score_head", "score_head",
]
