"""LoRA adapters in PEFT's folder format, both ways, so HF PEFT and vLLM load ours and we load theirs.

A folder holds

* ``adapter_config.json``: PEFT's ``LoraConfig`` fields (``peft_type`` "LORA", ``r``, ``lora_alpha``,
  ``lora_dropout``, ``target_modules``, ``use_rslora``, ``rank_pattern``...);
* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r, in) and
  ``...lora_B.weight`` (out, r) per adapted module. PEFT also writes/accepts ``.lora_A.default.weight``
  and keys without the ``base_model.model.`` prefix; we read all of these spellings.

A reward model (`engine.recipes.reward`) is a LoRA adapter plus its scalar head ``score``
(`engine.adapters.score_head`), in PEFT's sequence-classification form, so that
``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), dir)``
loads it: ``task_type: "SEQ_CLS"``, ``modules_to_save: ["score"]`` in the config, and the head's whole
weight (1, H) under ``base_model.model.score.weight`` (the key PEFT 0.21 writes for a
modules_to_save module; it lists ``["classifier", "score"]`` itself, which we read too, Llama has
no ``classifier``). Any other modules_to_save is refused. A plain adapter is written exactly as
before: ``task_type: "CAUSAL_LM"``, ``modules_to_save: null``, LoRA tensors only.

Our own extra information (training lineage, ``metadata=``) rides in the safetensors header under
the key ``lora_engine`` as a JSON string: PEFT ignores the header, whereas an unknown key in
``adapter_config.json`` makes it warn.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from engine.adapters.config_file import CONFIG_NAME, read_config_json
from engine.adapters.lora import ALL_LINEAR, LoRAConfig
from engine.adapters.score_head import SCORE, ScoreHead, attach_score_head, score_head
from engine.adapters.targets import find_targets, inject_lora, lora_modules
from engine.errors import InputError
from engine.atomic import atomic_dir
from engine.dtensors import copy_full_into, full_tensor
from models.safetensors_io import save_safetensors

WEIGHTS_NAME = "adapter_model.safetensors"
METADATA_KEY = "lora_engine"
PREFIX = _PREFIX = "base_model.model."  # of every key PEFT writes
_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.default)?\.weight$")
# DoRA's magnitude (out,): PEFT 0.21 writes `<module>.lora_magnitude_vector`; its module form also has the suffixes
_MAGNITUDE_RE = re.compile(r"^(?P<module>.+)\.(?P<which>lora_magnitude_vector)(?:\.default)?(?:\.weight)?$")
HEAD_KEY = f"{_PREFIX}{SCORE}.weight"  # a reward model's head, as PEFT saves a modules_to_save module
_HEAD_SPELLINGS = (f"{SCORE}.weight", f"{SCORE}.modules_to_save.default.weight")  # after the prefix
SEQ_CLS_MODULES = ({SCORE}, {"classifier", SCORE})  # modules_to_save of a reward model: ours, PEFT's

# PEFT LoraConfig features we cannot honour: field -> value(s) meaning "not used".
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "layers_to_transform": (None, []),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "target_parameters": (None, []),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None, []),
}


# ----------------------------------------------------------------------------- save

def _target_modules_for_save(model: nn.Module, names: list[str]) -> list[str]:
    """Short names (``q_proj``) when they select exactly the adapted modules, else the full names."""
    short = sorted({n.split(".")[-1] for n in names})
    selected = [n for n, _ in model.named_modules() if n and n.split(".")[-1] in short]
    return short if sorted(selected) == sorted(names) else sorted(names)


def peft_config_dict(model: nn.Module, cfg: LoRAConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` contents for the adapters in ``model`` (PEFT 0.21's LoraConfig fields)."""
    names = list(lora_modules(model))
    if not names:
        raise ValueError("save_lora: the model has no LoRA adapters")
    if cfg.target_modules == ALL_LINEAR:
        target_modules: list[str] | str = _target_modules_for_save(model, names)
    elif isinstance(cfg.target_modules, str):
        target_modules = cfg.target_modules
    else:
        target_modules = sorted(cfg.target_modules)
    exclude = cfg.exclude_modules if isinstance(cfg.exclude_modules, (str, type(None))) else list(cfg.exclude_modules)
    reward = score_head(model) is not None
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if reward else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules,
        "exclude_modules": exclude,
        "use_rslora": cfg.use_rslora,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": [SCORE] if reward else None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "lora_bias": False,
        "revision": None,
    }


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-keyed copies of the LoRA weights: ``base_model.model.<module>.lora_{A,B}.weight``, and
    of a reward model's head, ``base_model.model.score.weight`` (fp32; whole: under FSDP2 a
    collective, `engine.dtensors.full_tensor`)."""
    def whole(param: torch.Tensor) -> torch.Tensor:
        return full_tensor(param.detach()).to("cpu").contiguous().clone()

    tensors = {}
    for name, m in lora_modules(model).items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = whole(m.lora_A)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = whole(m.lora_B)
    head = score_head(model)
    if head is not None:
        tensors[HEAD_KEY] = whole(head.weight)
    return tensors


def save_lora(model: nn.Module, lora_cfg: LoRAConfig, out_dir: str | os.PathLike,
                 base_model_name_or_path: str | None, metadata: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapters as a PEFT folder at ``out_dir``, atomically; return the path.
    ``tensors``: `lora_state_dict` of the model, when the caller gathered it already.

    The folder is built under a temporary sibling name and renamed into place, so a reader never
    sees half an adapter; an existing folder at ``out_dir`` is replaced as a whole.
    """
    config = peft_config_dict(model, lora_cfg, base_model_name_or_path)
    return write_adapter_folder(out_dir, config, lora_state_dict(model) if tensors is None else tensors, metadata)


def write_adapter_folder(out_dir: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                         metadata: dict[str, Any] | None = None) -> Path:
    """Write ``adapter_config.json`` and the PEFT-keyed ``tensors`` (``metadata`` in the header
    under METADATA_KEY) as one folder, atomically (see `save_lora`)."""
    out = Path(out_dir)
    header = {"format": "pt"}
    if metadata is not None:
        header[METADATA_KEY] = json.dumps(metadata, sort_keys=True)
    with atomic_dir(out, fsync=True) as tmp:
        save_safetensors(tensors, tmp / WEIGHTS_NAME, metadata=header)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


# ----------------------------------------------------------------------------- load

def read_adapter_config(adapter_dir: str | os.PathLike, dora: bool = False) -> LoRAConfig:
    """Parse ``adapter_config.json`` into a LoRAConfig; refuse PEFT features we do not implement.
    ``dora``: accept ``use_dora`` (`engine.adapters.dora_format`); LoRA-only readers refuse it."""
    path, raw = read_config_json(adapter_dir)
    if raw.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{path}: peft_type is {raw.get('peft_type')!r}; only LORA adapters are supported")
    for key, neutral in _UNSUPPORTED.items():
        if raw.get(key) not in neutral and not (dora and key == "use_dora"):
            raise InputError(f"{path}: {key}={raw[key]!r} is not supported (LoRA on linear layers only)")
    modules_to_save = _modules_to_save(path, raw)
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            raise InputError(f"{path}: missing required field {key!r}")
    try:
        return LoRAConfig(
            r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
            target_modules=raw["target_modules"], use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {},
            exclude_modules=raw.get("exclude_modules"), modules_to_save=modules_to_save,
            use_dora=dora and bool(raw.get("use_dora")),
        )
    except InputError as err:
        raise InputError(f"{path}: {err}") from None


def _modules_to_save(path: Path, raw: dict[str, Any]) -> tuple[str, ...]:
    """("score",) for a reward model (task_type SEQ_CLS, modules_to_save ["score"] or PEFT's
    ["classifier", "score"]), () for a plain adapter; InputError for any other modules_to_save."""
    listed = raw.get("modules_to_save") or []
    seq_cls = raw.get("task_type") == "SEQ_CLS"
    if not isinstance(listed, list) or (listed and set(listed) not in SEQ_CLS_MODULES):
        raise InputError(f"{path}: modules_to_save={listed!r} is not supported (LoRA on linear layers only; "
                         f"the one exception is a reward model's {SCORE!r} head)")
    if listed and not seq_cls:
        raise InputError(f"{path}: modules_to_save={listed!r} is a sequence-classification head, but task_type is "
                         f"{raw.get('task_type')!r}; a reward model has task_type 'SEQ_CLS'")
    if seq_cls and not listed:
        raise InputError(f"{path}: task_type 'SEQ_CLS' without modules_to_save [{SCORE!r}]: a reward model saves its "
                         "score head")
    return (SCORE,) if listed else ()


def read_adapter_metadata(adapter_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``metadata`` dict given to `save_lora` (any method's folder), or None when the adapter has none."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as err:  # safetensors raises its own error types for corrupt headers/files
        raise InputError(f"{path}: cannot read safetensors file ({err})") from None
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError as err:
        raise InputError(f"{path}: the {METADATA_KEY!r} header (lineage) is not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: the {METADATA_KEY!r} header (lineage) must be a JSON object")
    return record


def read_adapter_weights(adapter_dir: str | os.PathLike, dora: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"lora_A": tensor, "lora_B": tensor}}`` from the safetensors file, any PEFT key spelling;
    ``dora``: also DoRA's ``"lora_magnitude_vector"`` (out,), required for every module."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        hint = " (adapter_model.bin is a pickle; re-save it with safetensors)" if (
            Path(adapter_dir) / "adapter_model.bin").exists() else ""
        raise InputError(f"{path}: not found{hint}")
    weights: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.removeprefix(_PREFIX) in _HEAD_SPELLINGS:
                    continue  # a reward model's head: `read_head_weight`
                match = _KEY_RE.match(key.removeprefix(_PREFIX)) or (
                    _MAGNITUDE_RE.match(key.removeprefix(_PREFIX)) if dora else None)
                if match is None:
                    raise InputError(f"{path}: tensor {key!r} is not a LoRA A/B weight (embedding, DoRA or "
                                     f"modules_to_save tensors are not supported)")
                weights.setdefault(match["module"], {})[match["which"]] = f.get_tensor(key)
    except InputError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt headers/files
        raise InputError(f"{path}: cannot read safetensors file ({err})") from None
    for module, pair in weights.items():
        for which in ("lora_A", "lora_B") + (("lora_magnitude_vector",) if dora else ()):
            if which not in pair:
                raise InputError(f"{path}: {module}.{which}.weight is missing")
            tensor = pair[which]
            if not tensor.is_floating_point():
                raise InputError(f"{path}: {module}.{which}.weight has dtype {tensor.dtype}, expected floats")
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise InputError(f"{path}: {module}.{which}.weight has {bad} non-finite values (NaN or inf): "
                                 "the adapter is broken (was its run diverging?)")
    return weights


def read_head_weight(adapter_dir: str | os.PathLike, cfg: LoRAConfig) -> torch.Tensor | None:
    """A reward model's head weight (1, H) from the safetensors file, when the config lists it
    (``cfg.modules_to_save``, `read_adapter_config`), else None; InputError when the file and the
    config disagree, or the weight is not a finite (1, H) float tensor."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            found = [k for k in f.keys() if k.removeprefix(_PREFIX) in _HEAD_SPELLINGS]
            weight = f.get_tensor(found[0]) if found else None
    except Exception as err:  # safetensors raises its own error types for corrupt headers/files
        raise InputError(f"{path}: cannot read safetensors file ({err})") from None
    if SCORE not in cfg.modules_to_save:
        if weight is not None:
            raise InputError(f"{path}: holds a {SCORE!r} head ({found[0]}) that {CONFIG_NAME} does not list in "
                             "modules_to_save")
        return None
    if weight is None:
        raise InputError(f"{path}: no {HEAD_KEY} (the reward model's head that {CONFIG_NAME} lists in "
                         "modules_to_save)")
    if not weight.is_floating_point() or weight.dim() != 2 or weight.shape[0] != 1:
        raise InputError(f"{path}: {found[0]} has shape {tuple(weight.shape)} and dtype {weight.dtype}; a reward "
                         "head is a (1, hidden) float weight (num_labels=1)")
    bad = int((~torch.isfinite(weight)).sum())
    if bad:
        raise InputError(f"{path}: {found[0]} has {bad} non-finite values (NaN or inf): the reward model is broken")
    return weight


def check_head_fits(adapter_dir: str | os.PathLike, head: torch.Tensor | None, hidden_size: int) -> None:
    """A read head (or None) against the model's hidden size."""
    if head is not None and head.shape[1] != hidden_size:
        raise InputError(f"{Path(adapter_dir) / WEIGHTS_NAME}: {HEAD_KEY} has shape {tuple(head.shape)}, expected "
                         f"(1, {hidden_size}) (the base's hidden size)")


def _check_shapes(path: Path, model: nn.Module, cfg: LoRAConfig, targets: list[str],
                  weights: dict[str, dict[str, torch.Tensor]]) -> None:
    unknown = sorted(set(weights) - set(targets))
    if unknown:
        raise InputError(f"{path}: weights for {unknown[0]!r}, which the adapter config does not target "
                         f"or the model does not have ({len(unknown)} such modules)")
    missing = sorted(set(targets) - set(weights))
    if missing:
        raise InputError(f"{path}: no weights for targeted module {missing[0]!r} ({len(missing)} missing)")
    for name in targets:
        base = model.get_submodule(name)
        r = cfg.rank_for(name)
        expected = {"lora_A": (r, base.in_features), "lora_B": (base.out_features, r)}
        for which, shape in expected.items():
            got = tuple(weights[name][which].shape)
            if got != shape:
                raise InputError(f"{path}: {_PREFIX}{name}.{which}.weight has shape {got}, expected {shape} "
                                 f"(r={r}, base {base.out_features}x{base.in_features})")


def adapter_targets(model: nn.Module, adapter_dir: str | os.PathLike, cfg: LoRAConfig,
                    weights: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """The modules of ``model`` (without LoRA; a meta-device model will do) that the adapter in
    ``adapter_dir`` targets, after checking that its ``weights`` cover exactly those modules with
    A (r, in) and B (out, r). Raises InputError naming adapter_config.json or the weights file."""
    try:
        targets = find_targets(model, cfg)
    except InputError as err:
        raise InputError(f"{Path(adapter_dir) / CONFIG_NAME}: {err}") from None
    _check_shapes(Path(adapter_dir) / WEIGHTS_NAME, model, cfg, targets, weights)
    return targets


def load_lora(model: nn.Module, adapter_dir: str | os.PathLike) -> LoRAConfig:
    """Inject LoRA into ``model`` per the folder's config and load its weights (as fp32); a reward
    model's head is attached as ``model.score`` (`engine.adapters.score_head`). Returns the config.

    Everything is checked before the model is touched: the config, every key and shape.
    """
    cfg = read_adapter_config(adapter_dir)
    weights = read_adapter_weights(adapter_dir)
    head = read_head_weight(adapter_dir, cfg)
    adapter_targets(model, adapter_dir, cfg, weights)
    check_head_fits(adapter_dir, head, model.config.hidden_size)
    inject_lora(model, cfg)
    assign_adapter_weights(model, weights)
    if head is not None:
        attach_score_head(model, ScoreHead(head).to(model.model.embed_tokens.weight.device))
    return cfg


def load_lora_weights(model: nn.Module, adapter_dir: str | os.PathLike,
                      weights: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Copy a saved adapter's weights into a model that already has the same LoRA layers (resume),
    and the head into a reward model's ``score``. ``weights``: the folder's `read_adapter_weights`,
    when the caller read (and reshaped) them already."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    weights = read_adapter_weights(adapter_dir) if weights is None else weights
    head_weight = read_head_weight(adapter_dir, read_adapter_config(adapter_dir))
    head = score_head(model)
    if (head is None) != (head_weight is None):
        raise InputError(f"{path}: {'has no' if head_weight is None else 'has a'} reward head ({HEAD_KEY}), "
                         f"the model {'has one' if head is not None else 'has none'}")
    if head is not None and tuple(head_weight.shape) != tuple(head.weight.shape):
        raise InputError(f"{path}: {HEAD_KEY} has shape {tuple(head_weight.shape)}, expected "
                         f"{tuple(head.weight.shape)}")
    modules = lora_modules(model)
    if set(weights) != set(modules):
        diff = sorted(set(weights) ^ set(modules))
        raise InputError(f"{path}: its LoRA modules differ from the model's (e.g. {diff[0]!r})")
    for name, m in modules.items():
        for which, param in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            got = tuple(weights[name][which].shape)
            if got != tuple(param.shape):
                raise InputError(f"{path}: {name}.{which} has shape {got}, expected {tuple(param.shape)}")
    assign_adapter_weights(model, weights)
    if head is not None:
        copy_full_into(head.weight, head_weight)


@torch.no_grad()
def assign_adapter_weights(model: nn.Module, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy ``{module: {"lora_A", "lora_B"}}`` into the model's LoRA parameters (cast to their fp32).

    Shapes and module names must have been checked (`adapter_targets` or the caller)."""
    modules = lora_modules(model)
    for name, pair in weights.items():
        copy_full_into(modules[name].lora_A, pair["lora_A"])  # plain, or this rank's FSDP2 shard
        copy_full_into(modules[name].lora_B, pair["lora_B"])
