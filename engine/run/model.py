"""The model a run trains: the frozen base (dense or NF4) with an adapter (``--peft``: LoRA, DoRA,
IA³, prefix, bottleneck; `engine.adapters.methods`) that is the only trainable part, a fresh one
from the flags or the one given with ``--init-adapter``; for a reward model the adapter includes
the scalar head ``score`` (`engine.adapters.score_head`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.adapters import (
    adapter_modules,
    adapter_params,
    config_from_flags,
    folder_method,
    inject_adapter,
    load_adapter,
    method_named,
    read_adapter_metadata,
    set_trainable,
)
from engine.adapters.lora_init import reads_dense_base
from engine.adapters.score_head import attach_score_head, initializer_range, new_score_head, score_head
from engine.config import TrainConfig
from engine.dtensors import full_tensor
from engine.errors import InputError
from kernels.fp8 import scaled_mm_available
from models import LlamaConfig, load_model
from models.quantized import quantize_linears
from models.skeleton import meta_model


@dataclass
class TrainableModel:
    """The model, its adapter's configuration (the method's: `engine.adapters.methods`), the
    starting adapter's lineage (None for a fresh adapter) and the number of trainable parameters."""

    model: nn.Module
    lora_cfg: Any
    parent_lineage: dict | None
    trainable_parameters: int


def check_model_fits(cfg: TrainConfig, model_config: LlamaConfig, max_token_id: int,
                     with_score_head: bool = False) -> None:
    """Before any weight is loaded: the data's token ids fit the vocabulary, and the adapter (the
    starting one, or the method's from the flags: for LoRA its targets exist and the rank is at most
    the smallest dimension of a targeted linear) fits the model. Checked on a meta-device model.
    A starting adapter with a reward head is for a reward run only (``with_score_head``), and its
    head must fit the hidden size."""
    if max_token_id >= model_config.vocab_size:
        raise InputError(f"{cfg.data}: token id {max_token_id} is outside the model's vocabulary of "
                         f"{model_config.vocab_size} (the tokenizer has more tokens than the model's embedding)")
    skeleton = meta_model(model_config)
    if cfg.init_adapter:
        # any method's folder: every key and shape checked against the model, a reward head's too
        folder_method(cfg.init_adapter).load(skeleton, cfg.init_adapter)
        if score_head(skeleton) is not None and not with_score_head:
            raise InputError(f"--init-adapter {cfg.init_adapter}: a reward model (a 'score' head beside LoRA); "
                             f"--method {cfg.method} starts from a causal-LM adapter (from --method sft or dpo)")
        return
    method_named(cfg.peft).check_fits(skeleton, config_from_flags(cfg))


def check_quant_device(quant: str, device: torch.device) -> None:
    """``--quant fp8`` computes in FP8 on a CUDA GPU of compute capability ≥ 8.9 (Ada, Hopper) and
    emulates it on a CPU (correct, for tests); an older GPU has no FP8 tensor cores: refuse it."""
    if quant == "fp8" and device.type == "cuda" and not scaled_mm_available(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise InputError(f"--quant fp8 needs FP8 tensor cores (compute capability >= 8.9: L4, L40, H100, H200); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use --quant int8 or nf4")


def non_finite_parameter(model: nn.Module) -> str | None:
    """The name of the first adapter tensor (LoRA, or a reward head) with a NaN or an infinity
    (with how many), else None."""
    for name, param in adapter_params(model).items():
        bad = int((~torch.isfinite(full_tensor(param.detach()))).sum())  # FSDP2: gathered on every rank
        if bad:
            return f"{name}: {bad} of {param.numel()} values are NaN or infinite"
    return None


def build_model(cfg: TrainConfig, model_dir: Path, device: torch.device, dtype: torch.dtype,
                with_score_head: bool = False) -> TrainableModel:
    """Load the base (quantized to NF4 with ``--quant nf4``), attach the adapter, freeze the rest.

    ``with_score_head`` (a reward model): the adapter includes the head ``model.score``, the
    starting adapter's when it has one, else a fresh one (`new_score_head`: HF's initialisation,
    seeded by ``cfg.seed`` on a generator of its own). It exists before the model is wrapped for
    DDP or sharded by FSDP2 (`engine.run.session.Run.build_model`), so both treat it as they treat
    LoRA's weights.

    The global RNG is seeded first: it draws LoRA A's initialisation and, later, dropout.
    ``--lora-init`` initialises a fresh LoRA/DoRA (`engine.adapters.lora_init`); for ``loftq``
    the base is loaded dense and quantized to NF4 after injection (the dense weights are on the
    device while loading, as PEFT's LoftQ needs them too).
    ``--init-adapter`` brings its own r, alpha and targets; dropout is a training choice and
    comes from the flags either way. Gradient checkpointing defaults to on for a GPU;
    ``--offload-activations`` turns it on, with the block inputs held in CPU memory;
    ``--mlp-chunk-tokens`` runs the MLPs over token chunks in training.
    """
    torch.manual_seed(cfg.seed)
    quantize = None if cfg.quant == "none" else cfg.quant
    check_quant_device(cfg.quant, device)
    # LoftQ reads the dense weights (their NF4 rounding is what it corrects) and quantizes the
    # linears it adapts itself; the others are quantized once it is done
    dense_first = quantize is not None and not cfg.init_adapter and reads_dense_base(config_from_flags(cfg))
    model = load_model(model_dir, dtype=dtype, device=device, quantize=None if dense_first else quantize)
    if cfg.init_adapter:
        lora_cfg = load_adapter(model, cfg.init_adapter)
        if hasattr(lora_cfg, "dropout"):  # a training choice, from the flags (methods with dropout)
            lora_cfg.dropout = cfg.lora_dropout
            for module in adapter_modules(model).values():
                module.dropout = cfg.lora_dropout
        parent = read_adapter_metadata(cfg.init_adapter)
    else:
        lora_cfg, parent = config_from_flags(cfg), None
        inject_adapter(model, lora_cfg)
        if dense_first:
            quantize_linears(model, fmt=quantize)
    if with_score_head and score_head(model) is None:
        attach_score_head(model, new_score_head(model.config.hidden_size, cfg.seed, initializer_range(model_dir),
                                                device=device))
    trainable = set_trainable(model)
    model.gradient_checkpointing = cfg.offload_activations or (
        cfg.grad_checkpointing if cfg.grad_checkpointing is not None else device.type == "cuda")
    model.offload_activations = cfg.offload_activations
    model.mlp_chunk_tokens = cfg.mlp_chunk_tokens
    return TrainableModel(model, lora_cfg, parent, trainable)
