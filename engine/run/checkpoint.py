"""Resumable checkpoints: written atomically, found by their completion marker, pruned to the last N.

Layout of ``OUTPUT/checkpoints/step-000120/``:

    adapter/                     PEFT-format adapter (usable on its own)
    optimizer.safetensors        AdamW state per trainable parameter: ``{name}.exp_avg``,
                                 ``{name}.exp_avg_sq``, ``{name}.step``
    rng.safetensors              torch CPU (and CUDA) generator states
    state.json                   step, data position, counters, run config, python RNG state
    <name>.safetensors           tensors a method keeps beside them (DPO: reference log-probs)
    COMPLETE                     written last: a folder without it is ignored

A checkpoint is written into ``.tmp-step-000120`` and renamed into place only when complete, and
older checkpoints are removed only after that, so a kill at any moment (``kill -9`` included) leaves
the previous checkpoint loadable; a save that fails (a full disk) removes its temporary folder.
No pickle anywhere: tensors in safetensors, the rest in JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from engine.atomic import fsync_files
from engine.dtensors import full_tensor, like
from engine.errors import InputError
from models.safetensors_io import save_safetensors

MARKER = "COMPLETE"
PREFIX = "step-"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _named_trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state keyed by parameter name, whole (stable across processes and
    world sizes: FSDP2's shards are gathered, a collective every rank must call)."""
    out: dict[str, torch.Tensor] = {}
    for name, param in _named_trainable(model).items():
        for key, value in optimizer.state.get(param, {}).items():
            tensor = full_tensor(value) if torch.is_tensor(value) else torch.tensor(value)
            out[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
    return out


def load_optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           tensors: dict[str, torch.Tensor], where: Path) -> None:
    for name, param in _named_trainable(model).items():
        state = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            full = f"{name}.{key}"
            if full not in tensors:
                raise InputError(f"{where}: optimizer state has no {full!r}; was the run's LoRA setup changed?")
            # on the parameter's device (fused AdamW keeps its step there), and for a sharded
            # parameter (FSDP2) cut to this rank's shard
            state[key] = like(tensors[full], param) if key != "step" else tensors[full].to(param.device)
        optimizer.state[param] = state


def rng_tensors() -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda_{i}"] = state
    return states


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"{PREFIX}{step:06d}"


def save_checkpoint(output_dir: str | Path, step: int, optimizer_state: dict[str, torch.Tensor],
                    state: dict[str, Any], write_adapter: Callable[[Path], None], keep: int,
                    extras: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then keep only the newest ``keep`` ones.

    ``optimizer_state``: `optimizer_tensors`; ``extras``: ``{name: tensors}`` saved as
    ``name.safetensors`` (read back with `load_extra`).
    """
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(output_dir, step)
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_adapter(tmp / "adapter")
        save_safetensors(optimizer_state, tmp / "optimizer.safetensors")
        save_safetensors(rng_tensors(), tmp / "rng.safetensors")
        for name, tensors in (extras or {}).items():
            save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
        full_state = dict(state, step=step, python_rng=_python_rng_state())
        (tmp / "state.json").write_text(json.dumps(full_state, indent=2), encoding="utf-8")
        fsync_files(tmp)  # the marker below must never reach the disk before the files it vouches for
        (tmp / MARKER).write_text(str(step), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    prune_checkpoints(output_dir, keep)
    return final


def load_extra(checkpoint: Path, name: str) -> dict[str, torch.Tensor]:
    """The ``extras[name]`` tensors a checkpoint was saved with."""
    path = checkpoint / f"{name}.safetensors"
    if not path.is_file():
        raise InputError(f"{path}: missing from the checkpoint (was it written by another method?)")
    return load_file(str(path))


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_python_rng(saved: list[Any]) -> None:
    version, internal, gauss = saved
    random.setstate((version, tuple(internal), gauss))


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and unmarked folders are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    root = checkpoint_root(output_dir)
    for stale in root.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any]:
    """The JSON state of a complete checkpoint (step, data position, what it was made for...)."""
    if not (path / MARKER).is_file():
        raise InputError(f"{path}: checkpoint is incomplete (no {MARKER} marker)")
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{path / 'state.json'}: unreadable checkpoint state ({err})") from None
    if not isinstance(state, dict):
        raise InputError(f"{path / 'state.json'}: expected a JSON object")
    return state


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    load_adapter_weights: Callable[[Path], None]) -> dict[str, Any]:
    """Restore adapter weights, optimizer and RNG states; return the JSON state (step, data position...)."""
    state = read_state(path)
    load_adapter_weights(path / "adapter")
    load_optimizer_tensors(model, optimizer, load_file(str(path / "optimizer.safetensors")), path)
    restore_rng(load_file(str(path / "rng.safetensors")))
    _restore_python_rng(state.pop("python_rng"))
    return state
