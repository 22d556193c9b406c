"""What a run was made for, recorded in every checkpoint, so that ``--resume`` refuses to continue
a checkpoint under different conditions.

`run_identity` lists everything that decides the run's numbers: the method and its options, the
model (name, SHA-256 of config.json, and the names and sizes of its weight files: hashing a 7B
model's weights at every start would take minutes), the data files with their SHA-256, the data
pipeline (format, lengths, packing, prompt masking), the batch geometry (padding-free batches and
a token budget included: they change the dropout draws and the batches), MLP chunks when LoRA
has dropout (its masks are drawn per chunk), the seed, quantization and dtype, the adapter's
shape and its ``--peft`` method's settings (or the starting adapter's SHA-256), the optimizer's
settings (LoRA+'s ratio included), and the retention, replay,
KL-anchor and budget options when given.

`compare_identity` sorts the differences between a saved identity and the current one:

* a change of the learning-rate schedule (``lr``, ``lr_schedule``, ``warmup_steps``) or of the
  run's length (``max_steps``, ``epochs``) is accepted as deliberate and reported as a note, as is
  a model or data file that moved (same SHA-256, another path or name), and a new MLP chunk size
  (the way to resume a run that ran out of memory; only the dropout draws of later steps change);
* any other difference is a mismatch: ``--resume`` stops with exit 2 naming the fields.

Evaluation, checkpoint and logging intervals, the device, gradient checkpointing and activation
offload (and MLP chunks without dropout) are not part of it: they do not change the numbers (the
device and the chunks only by rounding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.config import TrainConfig
from engine.errors import InputError
from engine.run.checkpoint import latest_checkpoint, read_state
from engine.run.folder import data_file_record, file_sha256
from models.loading import weight_files

IDENTITY_FIELDS = ("method", "format", "eval_split", "max_len", "length_policy", "pack", "train_on_prompt",
                   "skip_invalid_records", "batch_size", "grad_accum", "seed", "quant", "weight_decay",
                   "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm", "lora_r", "lora_alpha",
                   "lora_dropout", "rslora", "target_modules", "dpo_beta", "dpo_loss", "dpo_label_smoothing",
                   "precompute_ref", "rpo_alpha")
ADAPTER_FIELDS = ("lora_r", "lora_alpha", "rslora", "target_modules")  # replaced by the starting adapter's hash
SCHEDULE_FIELDS = ("lr", "lr_schedule", "warmup_steps", "max_steps", "epochs")
NOTE_FIELDS = (*SCHEDULE_FIELDS, "model_name", "mlp_chunk_tokens")
GRPO_FIELDS = ("num_generations", "max_completion_len", "temperature", "top_p", "grpo_loss", "epsilon", "beta",
               "num_iterations", "reward", "reward_weights", "reward_model")  # only a GRPO run records them


def run_identity(cfg: TrainConfig, model_dir: Path, max_len: int, dtype: torch.dtype,
                 micro_batches_per_step: int | None = None) -> dict[str, Any]:
    """The identity of a run (see the module docstring); plain JSON values.

    ``grad_accum`` records the micro-batches of a step over all ranks (``--grad-accum`` × ranks
    under torchrun, `engine.run.distributed`): a run checkpointed on 2 ranks with --grad-accum 1
    resumes on 1 with --grad-accum 2, the same steps."""
    fields = {name: getattr(cfg, name) for name in IDENTITY_FIELDS}
    if micro_batches_per_step is not None:
        fields["grad_accum"] = micro_batches_per_step
    fields["max_len"] = max_len  # the resolved length, not the flag's None
    # Batching beyond padded / --pack (which "pack" records): only when used, so that a checkpoint
    # written before these options existed (padded or packed) still matches --batching padded / --pack.
    if cfg.batching == "padding-free":
        fields["batching"] = cfg.batching
    if cfg.max_tokens_per_batch is not None:
        fields["max_tokens_per_batch"] = cfg.max_tokens_per_batch
    if cfg.mlp_chunk_tokens is not None and cfg.lora_dropout > 0:  # the MLPs' dropout masks are drawn per chunk
        fields["mlp_chunk_tokens"] = cfg.mlp_chunk_tokens
    if cfg.method == "grpo":
        fields.update({name: getattr(cfg, name) for name in GRPO_FIELDS})
    # issue 14's options, only when used (older checkpoints match runs without them): the retention
    # file decides the cached base numbers, replay and the KL anchor the gradients, the budget the adapter
    if cfg.retain_data:
        fields["retain_data"] = data_file_record(cfg.retain_data)
    if cfg.replay_data:
        fields.update(replay_data=data_file_record(cfg.replay_data), replay_ratio=cfg.replay_ratio)
    if cfg.kl_to_base:
        fields["kl_to_base"] = cfg.kl_to_base
    if cfg.max_forgetting is not None:
        fields.update(max_forgetting=cfg.max_forgetting, on_budget=cfg.on_budget)
    fields.update(method_fields(cfg))
    if cfg.init_adapter:
        for name in ADAPTER_FIELDS:
            fields.pop(name, None)
        fields["init_adapter_sha256"] = file_sha256(Path(cfg.init_adapter) / "adapter_model.safetensors")
    fields["dtype"] = str(dtype).removeprefix("torch.")
    fields["model_name"] = cfg.model
    fields["model"] = {"config_sha256": file_sha256(model_dir / "config.json"),
                       "weights": {f.name: f.stat().st_size for f in weight_files(model_dir)}}
    fields["data"] = data_file_record(cfg.data)
    fields["eval_data"] = data_file_record(cfg.eval_data) if cfg.eval_data else None
    fields.update({name: getattr(cfg, name) for name in SCHEDULE_FIELDS})
    return fields


def method_fields(cfg: TrainConfig) -> dict[str, Any]:
    """The ``--peft`` method's settings, only where they differ from a plain LoRA run (so that a
    checkpoint from before they existed still matches a LoRA run); a starting adapter brings its own
    method and shape (its hash), so then only LoRA+'s ratio counts."""
    fields: dict[str, Any] = {}
    if cfg.loraplus_ratio is not None:
        fields["loraplus_ratio"] = cfg.loraplus_ratio
    if cfg.init_adapter:
        return fields
    if cfg.peft != "lora":
        fields["peft"] = cfg.peft
    if cfg.lora_init != "default":
        fields["lora_init"] = cfg.lora_init
    if cfg.peft == "prefix":
        fields.update(num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=cfg.prefix_projection)
    if cfg.peft == "bottleneck":
        fields.update(adapter_dim=cfg.adapter_dim, adapter_placement=cfg.adapter_placement)
    return fields


def compare_identity(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(mismatches, notes): "field: checkpoint X, now Y" for each difference."""
    mismatches, notes = [], []
    for name in sorted(saved.keys() | current.keys()):
        before, now = saved.get(name), current.get(name)
        if before == now:
            continue
        line = f"{name}: checkpoint {_short(before)}, now {_short(now)}"
        if name == "grad_accum":  # over all ranks: 2 ranks with --grad-accum 2 resume as 1 with --grad-accum 4
            line += " (micro-batches per step over all ranks: --grad-accum × the number of ranks)"
        same_file = isinstance(before, dict) and isinstance(now, dict) and before.get("sha256") == now.get("sha256")
        (notes if name in NOTE_FIELDS or same_file else mismatches).append(line)
    return mismatches, notes


def _short(value: Any) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"{value.get('path')} (sha256 {value['sha256'][:12]}…)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def resume_point(output: Path, identity: dict[str, Any]) -> tuple[Path, list[str]]:
    """The newest complete checkpoint of ``output``, after checking what it was made for
    (InputError on a mismatch, naming the fields); returns it with the accepted changes (notes)."""
    checkpoint = latest_checkpoint(output)
    if checkpoint is None:
        raise InputError(f"--resume: no complete checkpoint in {output / 'checkpoints'}")
    saved = read_state(checkpoint).get("made_for")
    if saved is None:
        return checkpoint, ["the checkpoint records no identity (written by an older version): not checked"]
    mismatches, notes = compare_identity(saved, identity)
    if mismatches:
        raise InputError(f"--resume: {checkpoint} was made for another run: {'; '.join(mismatches)}. "
                         "Resume with the original settings, or start a new run (another --output, or "
                         "--overwrite)")
    return checkpoint, notes
