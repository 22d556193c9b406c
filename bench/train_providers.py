"""The providers of the training benchmark: one LoRA / QLoRA training step each, on the same batch.

A provider is built once (`Provider`): ``prepare(batch)`` turns an engine `Batch` into what its
step takes (outside the timing), ``step(prepared)`` runs forward + backward + gradient clipping
(max norm 1) + AdamW on the LoRA parameters and returns the loss as a 0-d tensor left on the device.

* ``ours``: `models.load_model` (``quantize="nf4"`` for QLoRA) + `engine.adapters.inject_lora`, the
  step of `engine.recipes.sft` (`backward_window`: fused linear + cross-entropy), per-block
  gradient checkpointing, in the model's dtype as the trainer runs it. A padding-free batch (one
  row, ``segment_ids``) goes in as the trainer's packed rows do.
* ``hf_peft``: ``transformers.AutoModelForCausalLM`` (SDPA; for QLoRA ``BitsAndBytesConfig`` NF4 with
  double quantization and bf16 compute) + ``peft.get_peft_model``, ``model(**inputs).loss``; on a
  GPU under ``torch.autocast(bfloat16)`` as the HF Trainer with ``bf16=True``; an all-ones
  attention mask is left out (SDPA's causal path, as for full rows).
* ``liger``: the same after ``liger_kernel.transformers.apply_liger_kernel_to_llama()`` (Liger's
  RMSNorm, RoPE, SwiGLU and fused linear cross-entropy), a reference only. That call replaces
  classes inside transformers for the whole process, so it runs in a process of its own
  (`bench.bench_train` starts one per GPU provider).
* ``unsloth``: ``unsloth.FastLanguageModel.from_pretrained(folder, load_in_4bit=True)`` +
  ``FastLanguageModel.get_peft_model`` on the same folder; LoRA dropout 0, Unsloth's fast path
  (with dropout it leaves the LoRA matrices unpatched), so the comparison is the strict one for us.
  ``unsloth`` must be imported before transformers: also a process of its own.

Every provider uses r = 16, alpha = 32, every linear of the decoder blocks, non-reentrant
per-block gradient checkpointing and AdamW with torch's defaults (lr 1e-4).

As a worker (one provider, one case, in a fresh process; the row goes to ``--out`` as JSON, an
error as ``{"status": "error: ..."}``, so one provider that cannot import or fails leaves the
others running):

    python -m bench.train_providers --provider hf_peft --case '{"name": ...}' --out row.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.adapters import LoRAConfig, inject_lora, set_trainable
from engine.data.batching import Batch
from engine.recipes.sft import backward_window
from models import load_model

RANK, ALPHA, DROPOUT, LR = 16, 32.0, 0.05, 1e-4
UNSLOTH_DROPOUT = 0.0  # Unsloth's fast LoRA path needs dropout 0
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Case:
    """One configuration every provider runs."""

    name: str          # e.g. "smollm2-135m/lora/cpu/fp32"
    model_dir: str
    device: str
    dtype: str         # "fp32" or "bf16"
    quant: str         # "none" or "nf4"
    batch: int
    seq: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype]


@dataclass
class Provider:
    """``step(prepare(batch))`` is one training step; ``lora_dropout`` as this provider ran it."""

    prepare: Callable[[Batch], object]
    step: Callable[[object], torch.Tensor]
    lora_dropout: float = DROPOUT


def full_rows_batch(ids: torch.Tensor) -> Batch:
    """(B, T) token ids as a batch of B full rows, one document each: no padding, every next token a
    label, positions 0..T-1."""
    return Batch(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids),
                 position_ids=torch.arange(ids.shape[1], device=ids.device).expand_as(ids), segment_ids=None,
                 sample_ids=[[i] for i in range(ids.shape[0])], epoch=0, index=0)


def token_batch(vocab: int, case: Case, seed: int = 0) -> torch.Tensor:
    """(B, T) random token ids, the same for every provider."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (case.batch, case.seq), generator=g).to(case.device)


def lora_optimizer(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=LR)


def _optimizer_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- ours

def _our_model(case: Case) -> torch.nn.Module:
    model = load_model(case.model_dir, dtype=case.torch_dtype, device=case.device,
                       quantize=None if case.quant == "none" else case.quant)
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT, target_modules="all-linear"))
    set_trainable(model)
    model.gradient_checkpointing = True
    model.train()
    return model


def build_ours(case: Case) -> Provider:
    """Our model + LoRA and the SFT recipe's step."""
    model = _our_model(case)
    params, optimizer = lora_optimizer(model)
    device = torch.device(case.device)

    def step(batch: Batch) -> torch.Tensor:
        loss, _ = backward_window(model, [batch], device)
        _optimizer_step(params, optimizer)
        return loss

    return Provider(prepare=lambda batch: batch.to(device), step=step)


def build_ours_fsdp(case: Case) -> Provider:
    """Ours under FSDP2 in a process group of one rank (`engine.run.distributed`, what
    ``torchrun --nproc_per_node 1 -m engine.train --distributed fsdp`` runs): the cost of the
    sharding itself, its all-gathers and reduce-scatters, against ``ours`` (issue 11: within 5 %)."""
    import os
    import socket

    import torch.distributed as dist

    from engine.run.distributed import Parallel, shard_model

    device = torch.device(case.device)
    with socket.socket() as sock:  # a free port for the one-rank store
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1,
                            device_id=device if cuda else None)
    model = _our_model(case)
    shard_model(model)
    parallel = Parallel("fsdp", device)
    params, optimizer = lora_optimizer(model)

    def step(batch: Batch) -> torch.Tensor:
        loss, _ = backward_window(model, [batch], device, parallel)
        _optimizer_step(params, optimizer)
        return loss

    return Provider(prepare=lambda batch: batch.to(device), step=step)


# ----------------------------------------------------------------------------- HF family

def hf_inputs(batch: Batch, device: str) -> dict:
    """A padded `Batch` as transformers takes it: input_ids, labels (HF shifts them itself) and the
    attention mask unless it is all ones."""
    inputs = {"input_ids": batch.input_ids.to(device), "labels": batch.labels.to(device)}
    if not bool(batch.attention_mask.all()):
        inputs["attention_mask"] = batch.attention_mask.to(device)
    return inputs


def _hf_step(model: torch.nn.Module, case: Case) -> Callable[[dict], torch.Tensor]:
    params, optimizer = lora_optimizer(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=case.device.startswith("cuda"))

    def step(inputs: dict) -> torch.Tensor:
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        _optimizer_step(params, optimizer)
        return loss.detach()

    return step


def build_hf(case: Case) -> Provider:
    """transformers + PEFT (+ bitsandbytes) on the same folder, and one HF-style step.
    ``prepare_model_for_kbit_training`` is not called: it would cast norms and embeddings to fp32
    and only cost HF memory."""
    import peft
    import transformers

    kwargs = dict(dtype=case.torch_dtype, attn_implementation="sdpa")
    if case.quant == "nf4":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if case.device != "cpu":
        kwargs["device_map"] = case.device
    model = transformers.AutoModelForCausalLM.from_pretrained(case.model_dir, **kwargs)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    return Provider(prepare=lambda batch: hf_inputs(batch, case.device), step=_hf_step(model, case))


def build_liger(case: Case) -> Provider:
    """`build_hf` with Liger-Kernel's Llama kernels (process-wide: run it in a process of its own)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    return build_hf(case)


def build_unsloth(case: Case) -> Provider:
    """Unsloth's 4-bit loader and LoRA on the same folder (which holds a tokenizer, see
    `bench.bench_train.write_tokenizer`). Hub access off: the folder is local and the machine offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401  (before transformers, as Unsloth requires)
    from unsloth import FastLanguageModel

    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=case.model_dir, max_seq_length=case.seq, dtype=case.torch_dtype,
        load_in_4bit=case.quant == "nf4", use_gradient_checkpointing=True)
    model = FastLanguageModel.get_peft_model(
        model, r=RANK, lora_alpha=ALPHA, lora_dropout=UNSLOTH_DROPOUT, target_modules=list(LLAMA_LINEARS),
        bias="none", use_gradient_checkpointing=True, random_state=0)
    FastLanguageModel.for_training(model)
    return Provider(prepare=lambda batch: hf_inputs(batch, case.device), step=_hf_step(model, case),
                    lora_dropout=UNSLOTH_DROPOUT)


PROVIDERS: dict[str, Callable[[Case], Provider]] = {
    "ours": build_ours, "hf_peft": build_hf, "liger": build_liger, "unsloth": build_unsloth,
    "ours_fsdp": build_ours_fsdp}


# ----------------------------------------------------------------------------- timing

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_step(provider: Provider, prepared: object, device: str) -> tuple[float, torch.Tensor]:
    """(seconds, loss) of one step."""
    sync(device)
    start = time.perf_counter()
    loss = provider.step(prepared)
    sync(device)
    return time.perf_counter() - start, loss


def summarize(case: Case, provider: str, times: list[float], losses: list[float], peak: int | None,
              resident: int | None, tokens_per_step: int | None = None) -> dict:
    """One result row; ``tokens_per_s`` counts ``tokens_per_step`` (default B·T) per median step."""
    median = statistics.median(times)
    tokens = tokens_per_step or case.batch * case.seq
    return {"case": case.name, "provider": provider, "batch": case.batch, "seq": case.seq, "dtype": case.dtype,
            "quant": case.quant, "median_step_s": round(median, 4), "min_step_s": round(min(times), 4),
            "max_step_s": round(max(times), 4), "step_times_s": [round(t, 4) for t in times],
            "tokens_per_s": round(tokens / median, 2), "peak_mem_bytes": peak,
            "weights_resident_bytes": resident, "losses": [round(x, 5) for x in losses]}


def failure_reason(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters), what a failed provider records."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def run_provider(case: Case, name: str, warmup: int, steps: int, seed: int = 0) -> dict:
    """Build one provider, run ``warmup`` + ``steps`` steps on B full rows of random tokens and
    return its row; on CUDA the peak is the allocator's over the measured steps (weights, optimizer
    state and activations). Any failure is returned as ``{"status": "error: ..."}``."""
    head = {"case": case.name, "provider": name}
    try:
        vocab = json.loads((Path(case.model_dir) / "config.json").read_text())["vocab_size"]
        built = PROVIDERS[name](case)
        prepared = built.prepare(full_rows_batch(token_batch(vocab, case, seed)))
        cuda = case.device.startswith("cuda")
        resident = torch.cuda.memory_allocated() if cuda else None
        for _ in range(warmup):
            time_step(built, prepared, case.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runs = [time_step(built, prepared, case.device) for _ in range(steps)]
        peak = torch.cuda.max_memory_allocated() if cuda else None
    except Exception as err:  # noqa: BLE001  (any failure of a peer is a result, not a crash)
        traceback.print_exc()
        return {**head, "status": f"error: {failure_reason(err)}"}
    row = summarize(case, name, [t for t, _ in runs], [float(x) for _, x in runs], peak, resident)
    return {**row, "status": "ok", "lora_dropout": built.lora_dropout}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_providers", description=__doc__.split("\n")[0])
    parser.add_argument("--provider", required=True, choices=PROVIDERS)
    parser.add_argument("--case", required=True, help="the Case as JSON")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True, help="file for the row (JSON)")
    args = parser.parse_args(argv)
    case = Case(**json.loads(args.case))
    row = run_provider(case, args.provider, args.warmup, args.steps)
    Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    print(f"  {case.name} {args.provider}: {row['status']}"
          + (f", {row['tokens_per_s']:.0f} tok/s" if row.get("tokens_per_s") else ""), flush=True)
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())

