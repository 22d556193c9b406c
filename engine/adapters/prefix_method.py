"""Prefix tuning as an `engine.adapters.methods.AdapterMethod`: the flags' configuration, injection
and the folder, in HF PEFT 0.21's format.

A folder holds

* ``adapter_config.json``: PEFT's PrefixTuningConfig fields as PEFT writes them (peft_type
  "PREFIX_TUNING", task_type "CAUSAL_LM", ``num_virtual_tokens``, ``num_layers``, ``token_dim`` =
  nkv · hd and ``num_attention_heads`` = nkv (PEFT's sizes for a GQA model),
  ``num_transformer_submodules`` 1, ``encoder_hidden_size``, ``prefix_projection``...);
* ``adapter_model.safetensors``: ``prompt_embeddings`` (P, L·2·token_dim) fp32, the flat prefix
  X as PEFT saves it (its ``get_prompt_embedding_to_save``: the MLP's output when there is one);
  our lineage (``metadata=``) in its header, as for LoRA (`engine.adapters.peft_format`).

With ``--prefix-projection`` the MLP is folded at save: X = transform(embedding) is written as
``prompt_embeddings`` and the config says ``prefix_projection: false``: the tensor is the plain
prefix the model computes, which PEFT loads as such (PEFT loads prompt-learning folders for
inference only; what PEFT itself writes for a projected prefix is the same fold, with
``prefix_projection: true``, which its inference mode ignores). The raw training tensors (``embedding.weight`` (P, token_dim),
``transform.0.weight`` (E, token_dim), ``transform.0.bias``, ``transform.2.weight`` (L·2·token_dim,
E), ``transform.2.bias``) are kept beside it in `PROJECTION_NAME`, which PEFT ignores: with it
`load_adapter` and `load_adapter_weights` rebuild the MLP (resume continues exactly), and its
fold must equal ``prompt_embeddings`` (else the folder is refused as inconsistent). A PEFT folder
saved with ``prefix_projection: true`` holds only the fold: we load it as a plain prefix, as PEFT
does for inference.

Prefix tuning is not mergeable (`engine.adapters.merge.merge` raises `NotMergeable`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from engine.adapters.config_file import read_config_json
from engine.adapters.methods import AdapterMethod, register
from engine.adapters.peft_format import CONFIG_NAME, METADATA_KEY, WEIGHTS_NAME
from engine.adapters.prefix import PrefixConfig, PrefixEncoder, PrefixShape, inject_prefix, prefix_encoder
from engine.atomic import atomic_dir
from engine.dtensors import copy_full_into, full_tensor
from engine.errors import InputError
from models.safetensors_io import save_safetensors

PEFT_TYPE = "PREFIX_TUNING"
PROMPT_KEY = "prompt_embeddings"
PROJECTION_NAME = "prefix_projection.safetensors"  # the raw MLP tensors of a --prefix-projection run
RAW_KEYS = ("embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")
FOLD_ATOL = 1e-4  # fold of the raw tensors vs prompt_embeddings (fp32, recomputed on another device)


# ----------------------------------------------------------------------------- save

def peft_config_dict(shape: PrefixShape, encoder: PrefixEncoder, base_model_name_or_path: str | None) -> dict:
    """``adapter_config.json`` as PEFT 0.21 writes a PrefixTuningConfig (without ``peft_version``:
    not written by PEFT), the projection folded (``prefix_projection`` false)."""
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "encoder_hidden_size": encoder.encoder_hidden_size or shape.token_dim,
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": None,
        "num_attention_heads": shape.num_kv_heads,
        "num_layers": shape.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": encoder.num_virtual_tokens,
        "peft_type": PEFT_TYPE,
        "prefix_projection": False,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": shape.token_dim,
    }


def fold(raw: dict[str, torch.Tensor]) -> torch.Tensor:
    """X = W2 · tanh(W0 · e + b0) + b2 per virtual token (P, L·2·token_dim), in fp32."""
    e, w0, b0, w2, b2 = (raw[k].float() for k in RAW_KEYS)
    return torch.tanh(e @ w0.T + b0) @ w2.T + b2


def prefix_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"prompt_embeddings": X}`` plus, with a projection, the raw tensors keyed ``RAW_KEYS``
    (whole, fp32, on the CPU; under FSDP2 a collective)."""
    encoder = _encoder_of(model)
    raw = {k: full_tensor(p.detach()).float().cpu().contiguous().clone() for k, p in encoder.named_parameters()}
    if not encoder.prefix_projection:
        return {PROMPT_KEY: raw["embedding.weight"]}
    return {PROMPT_KEY: fold(raw).contiguous(), **raw}


def save_prefix(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None,
                metadata: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the folder (see the module docstring) atomically; return its path."""
    encoder = _encoder_of(model)
    tensors = prefix_state_dict(model) if tensors is None else tensors
    config = peft_config_dict(encoder.shape, encoder, base_model_name_or_path)
    header = {"format": "pt"}
    if metadata is not None:
        header[METADATA_KEY] = json.dumps(metadata, sort_keys=True)
    out = Path(out_dir)
    with atomic_dir(out, fsync=True) as tmp:
        save_safetensors({PROMPT_KEY: tensors[PROMPT_KEY]}, tmp / WEIGHTS_NAME, metadata=header)
        if encoder.prefix_projection:
            save_safetensors({k: tensors[k] for k in RAW_KEYS}, tmp / PROJECTION_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _encoder_of(model: nn.Module) -> PrefixEncoder:
    encoder = prefix_encoder(model)
    if encoder is None:
        raise ValueError("the model has no prefix encoder (inject or load prefix tuning first)")
    return encoder


# ----------------------------------------------------------------------------- read and check

def _read_json(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    path, raw = read_config_json(adapter_dir)
    if raw.get("peft_type") != PEFT_TYPE:
        raise InputError(f"{path}: not a {PEFT_TYPE} adapter config")
    return raw


def _whole(path: Path, raw: dict[str, Any], key: str, least: int = 1) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InputError(f"{path}: {key}={value!r}: expected a whole number >= {least}")
    return value


def _read_tensors(path: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Exactly ``keys`` from a safetensors file, float and finite; InputError naming the file."""
    if not path.is_file():
        raise InputError(f"{path}: not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            found = sorted(f.keys())
            if found != sorted(keys):
                raise InputError(f"{path}: holds tensors {found}, expected exactly {sorted(keys)}")
            tensors = {k: f.get_tensor(k) for k in keys}
    except InputError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt headers/files
        raise InputError(f"{path}: cannot read safetensors file ({err})") from None
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise InputError(f"{path}: {key} has dtype {t.dtype}, expected floats")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise InputError(f"{path}: {key} has {bad} non-finite values (NaN or inf): the adapter is broken")
    return tensors


def read_prefix_config(adapter_dir: str | os.PathLike) -> PrefixConfig:
    """The folder's configuration: plain, or with the projection when `PROJECTION_NAME` is there
    (its width E from ``transform.0.weight``, read from the header only)."""
    path = Path(adapter_dir) / CONFIG_NAME
    raw = _read_json(adapter_dir)
    if raw.get("task_type") not in ("CAUSAL_LM", None):
        raise InputError(f"{path}: task_type {raw.get('task_type')!r}: only CAUSAL_LM prefix tuning is supported")
    if raw.get("num_transformer_submodules", 1) not in (1, None):
        raise InputError(f"{path}: num_transformer_submodules={raw['num_transformer_submodules']!r}: a decoder-only "
                         "model has 1 (2 is an encoder-decoder's)")
    if raw.get("modules_to_save"):
        raise InputError(f"{path}: modules_to_save={raw['modules_to_save']!r} is not supported with prefix tuning")
    P = _whole(path, raw, "num_virtual_tokens")
    projection = Path(adapter_dir) / PROJECTION_NAME
    if not projection.is_file():
        return PrefixConfig(num_virtual_tokens=P)
    try:
        with safe_open(str(projection), framework="pt") as f:
            width = f.get_slice("transform.0.weight").get_shape()[0] if "transform.0.weight" in f.keys() else None
    except Exception as err:
        raise InputError(f"{projection}: cannot read safetensors file ({err})") from None
    if width is None:
        raise InputError(f"{projection}: no transform.0.weight (the projection's first linear)")
    return PrefixConfig(num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=int(width))


def read_prefix(model: nn.Module, adapter_dir: str | os.PathLike) -> tuple[PrefixConfig, dict[str, torch.Tensor]]:
    """The folder's configuration and the parameters of its `PrefixEncoder` (local names), every
    field, key and shape checked against ``model`` (a meta-device model will do)."""
    folder = Path(adapter_dir)
    path = folder / CONFIG_NAME
    raw = _read_json(folder)
    cfg = read_prefix_config(folder)
    shape = PrefixShape.of(model)
    for key, want in (("num_layers", shape.num_layers), ("token_dim", shape.token_dim),
                      ("num_attention_heads", shape.num_kv_heads)):
        if raw.get(key, want) != want:
            raise InputError(f"{path}: {key}={raw[key]!r}, the model has {want} (num_layers: its layers; token_dim: "
                             f"key/value heads x head dim = {shape.num_kv_heads} x {shape.head_dim}; "
                             "num_attention_heads: its key/value heads)")
    P = cfg.num_virtual_tokens
    prompt = _read_tensors(folder / WEIGHTS_NAME, (PROMPT_KEY,))[PROMPT_KEY]
    if tuple(prompt.shape) != (P, shape.flat_dim):
        raise InputError(f"{folder / WEIGHTS_NAME}: {PROMPT_KEY} has shape {tuple(prompt.shape)}, expected "
                         f"({P}, {shape.flat_dim}) (num_virtual_tokens, layers x 2 x token_dim)")
    if not cfg.prefix_projection:
        return cfg, {"embedding.weight": prompt}
    projection = folder / PROJECTION_NAME
    params = _read_tensors(projection, RAW_KEYS)
    E, D = cfg.encoder_hidden_size, shape.token_dim
    expected = {"embedding.weight": (P, D), "transform.0.weight": (E, D), "transform.0.bias": (E,),
                "transform.2.weight": (shape.flat_dim, E), "transform.2.bias": (shape.flat_dim,)}
    for key, want in expected.items():
        if tuple(params[key].shape) != want:
            raise InputError(f"{projection}: {key} has shape {tuple(params[key].shape)}, expected {want}")
    off = (fold(params) - prompt.float()).abs().max().item()
    if off > FOLD_ATOL * max(1.0, prompt.abs().max().item()):
        raise InputError(f"{projection}: the projection's fold differs from {WEIGHTS_NAME}'s {PROMPT_KEY} by up to "
                         f"{off:.3g}: the two files are not of one adapter")
    return cfg, params


@torch.no_grad()
def _assign(encoder: PrefixEncoder, params: dict[str, torch.Tensor]) -> None:
    for key, param in encoder.named_parameters():
        copy_full_into(param, params[key])  # plain, or this rank's FSDP2 shard


def load_prefix(model: nn.Module, adapter_dir: str | os.PathLike) -> PrefixConfig:
    """Check the folder against ``model``, then attach its prefix encoder with its weights."""
    cfg, params = read_prefix(model, adapter_dir)
    inject_prefix(model, cfg)
    _assign(prefix_encoder(model), params)
    return cfg


def load_prefix_weights(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Copy a folder's weights into the model's prefix encoder of the same configuration (resume)."""
    encoder = prefix_encoder(model)
    if encoder is None:
        raise InputError(f"{adapter_dir}: a prefix-tuning adapter, but the model has no prefix encoder")
    cfg, params = read_prefix(model, adapter_dir)
    if (cfg.num_virtual_tokens, cfg.prefix_projection, cfg.encoder_hidden_size) != (
            encoder.num_virtual_tokens, encoder.prefix_projection, encoder.encoder_hidden_size):
        raise InputError(f"{Path(adapter_dir) / CONFIG_NAME}: num_virtual_tokens {cfg.num_virtual_tokens}, projection "
                         f"{cfg.prefix_projection} (width {cfg.encoder_hidden_size}); the model's prefix has "
                         f"{encoder.num_virtual_tokens}, {encoder.prefix_projection} ({encoder.encoder_hidden_size})")
    _assign(encoder, params)


# ----------------------------------------------------------------------------- the method

class PrefixMethod(AdapterMethod):
    name = "prefix"
    mergeable = False

    def config_from_flags(self, flags: Any) -> PrefixConfig:
        return PrefixConfig(num_virtual_tokens=flags.num_virtual_tokens, prefix_projection=flags.prefix_projection)

    def inject(self, model: nn.Module, config: PrefixConfig) -> list[str]:
        return inject_prefix(model, config)

    def claims(self, raw: dict[str, Any]) -> bool:
        return raw.get("peft_type") == PEFT_TYPE

    def save(self, model: nn.Module, config: PrefixConfig, out_dir: str | os.PathLike,
             base_model_name_or_path: str | None, metadata: dict[str, Any] | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> Path:
        return save_prefix(model, out_dir, base_model_name_or_path, metadata, tensors)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return prefix_state_dict(model)

    def read_config(self, adapter_dir: str | os.PathLike) -> PrefixConfig:
        return read_prefix_config(adapter_dir)

    def load(self, model: nn.Module, adapter_dir: str | os.PathLike) -> PrefixConfig:
        return load_prefix(model, adapter_dir)

    def load_weights(self, model: nn.Module, adapter_dir: str | os.PathLike) -> None:
        load_prefix_weights(model, adapter_dir)


PREFIX = register(PrefixMethod())
