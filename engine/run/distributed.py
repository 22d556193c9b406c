"""Training on several processes with PyTorch's own stack: torchrun, DDP, FSDP2.

    torchrun --nproc_per_node 2 -m engine.train --model M --data D --distributed ddp
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint host:29500 \\
        -m engine.train --model llama2-70b --quant nf4 --data D --distributed fsdp

`Parallel.start` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) and
joins the process group: NCCL on GPUs (rank r on ``cuda:LOCAL_RANK``), gloo on CPUs, with a
timeout (``--dist-timeout``) on every collective, so a rank whose peer died stops instead of
waiting for ever. ``--distributed auto`` is one process without torchrun (or with one rank) and
DDP with more; ``ddp`` and ``fsdp`` need torchrun.

How N ranks reproduce one process (`Parallel.window`, `micro_batches`, `backward`):

* ``--batch-size b`` is per rank. A step takes the next ``grad_accum · N`` micro-batches of the
  one global order (the order one process uses), rank r the r-th run of ``grad_accum`` of them.
  So N ranks with ``--grad-accum g`` see step by step the micro-batches of one process with
  ``--grad-accum g·N``; the data position (epoch, batch) saved in a checkpoint is that of the
  global order, and any number of ranks resumes from it.
* each micro-batch trains under a seed of its own (seed, epoch, batch index): LoRA dropout draws
  the same masks whichever rank, and after whatever resume, trains it.
* the per-token normalisation N_tok is summed over the ranks before the backward, and each
  rank's loss is scaled by the world size, because DDP and FSDP2 average gradients:
  ``(1/W) Σ_r W·Σ_{t∈r} ℓ_t / N_tok = Σ_t ℓ_t / N_tok``, the gradient of the whole global batch.

Strategies (`Parallel.prepare`):

* DDP (`DistributedDataParallel`): every rank holds the whole model; only parameters that
  require a gradient, the LoRA A and B, get DDP's hooks, so only they are all-reduced, in
  buckets, overlapped with the backward; micro-batches but the last of a step skip the sync
  (``no_sync``). The model's ``hidden_states`` runs through the DDP wrapper
  (`models.llama.LlamaForCausalLM.route_hidden_states`), which is what DDP needs to see.
* FSDP2 (`fully_shard` on each decoder block, then on the root; `models.llama`'s
  ``hidden_states`` registered as a forward method): every parameter is sharded on dim 0
  across the ranks and all-gathered per block for the forward, the recompute and the backward;
  the LoRA gradients are reduce-scattered and the AdamW moments exist for the local shard only.
  An NF4 base is sharded and all-gathered as its quantized bytes: `quantized_bytes_as_parameters`
  makes the packed codes, the absmax and the nested absmax frozen parameters (they were
  buffers, which FSDP2 would replicate; integer ones as 1-byte float views of the same bytes, which
  FSDP2 before torch 2.13 needs), so the all-gather moves NF4 bytes and each block
  dequantizes its own weights after it, as on one device. LoRA masters stay fp32 and so do
  their reduce-scatters; the base computes in its own dtype (bf16 on a GPU): no cast policy.

Evaluation is shared too (`evaluation_share`: equal rounds, each batch counted by one rank).
Host-side agreement (counts, the SIGTERM stop, barriers) runs on a gloo group, so it never
waits on the GPU stream.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.errors import InputError
from engine.run.setup import resolve_device

STRATEGIES = ("auto", "ddp", "fsdp")
_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: (seed, epoch, index) -> distinct seeds


def micro_batch_seed(seed: int, epoch: int, index: int) -> int:
    """The seed a micro-batch trains under: a function of the run's seed and the batch's place in
    the global order only (63 bits, what ``torch.manual_seed`` takes)."""
    return (seed * _SEED_MIX + epoch * 1_000_003 + index) % (2**63 - 1)


@dataclass
class Parallel:
    """This process's place in the job: strategy (``single``, ``ddp`` or ``fsdp``), rank, world
    size and device, and the collectives the training step needs."""

    strategy: str
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    control: Any = None                  # gloo group for host-side agreement (None: the default group)
    _ddp: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------ joining the job

    @classmethod
    def single(cls, device: torch.device) -> Parallel:
        return cls("single", device)

    @classmethod
    def start(cls, strategy: str, device_flag: str, timeout_s: float) -> Parallel:
        """Join the torchrun job this process belongs to (or none: one process)."""
        if strategy not in STRATEGIES:
            raise InputError(f"--distributed {strategy!r}: expected one of {', '.join(STRATEGIES)}")
        launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))
        world = int(os.environ.get("WORLD_SIZE", "1")) if launched else 1
        if not launched:
            if strategy != "auto":
                raise InputError(f"--distributed {strategy}: start the run with torchrun (e.g. torchrun "
                                 "--nproc_per_node 2 -m engine.train ...); RANK / WORLD_SIZE are not set")
            return cls.single(resolve_device(device_flag))
        if strategy == "auto" and world == 1:
            return cls.single(resolve_device(device_flag))
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = _rank_device(device_flag, local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend, timeout=timeout, device_id=device)
            control = dist.new_group(backend="gloo", timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
            control = None
        return cls("ddp" if strategy == "auto" else strategy, device, rank, world, local_rank, control)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy != "single"

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ the model

    def check_replica_fits(self, model_config: Any, dtype: torch.dtype, quant: str) -> None:
        """Under DDP on a GPU: `check_replica_fits` against this GPU's memory (else nothing)."""
        if self.strategy == "ddp" and self.device.type == "cuda":
            check_replica_fits(model_config, dtype, quant, torch.cuda.get_device_properties(self.device).total_memory)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Wrap (DDP) or shard (FSDP2) the model in place; returns it (the same object)."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # every rank loaded the same files and seeded the same LoRA init: no broadcast needed, at
            # the start or in the forward (the buffers are constants); torch 2.13 renamed the option
            named = inspect.signature(DistributedDataParallel).parameters
            no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in named else "broadcast_buffers": False}
            self._ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                                else None, init_sync=False, **no_buffer_sync)
            model.route_hidden_states(self._ddp)
        elif self.strategy == "fsdp":
            shard_model(model)
        return model

    # ------------------------------------------------------------------ the step

    def window(self, micro_batches: list) -> list:
        """This rank's share of a step's ``grad_accum · world`` micro-batches (in global order)."""
        per_rank = len(micro_batches) // self.world
        return micro_batches[self.rank * per_rank:(self.rank + 1) * per_rank]

    def micro_batches(self, window: list, seed: int | None = None) -> Iterator:
        """The window's micro-batches as this rank trains them: each under `micro_batch_seed`
        (with ``seed``), and under DDP without the gradient all-reduce but for the last."""
        for i, batch in enumerate(window):
            if seed is not None:
                torch.manual_seed(micro_batch_seed(seed, batch.epoch, batch.index))
            skip_sync = self._ddp is not None and i < len(window) - 1
            with self._ddp.no_sync() if skip_sync else contextlib.nullcontext():
                yield batch

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled by the world size that DDP / FSDP2 divide gradients by."""
        (loss * self.world if self.world > 1 else loss).backward()

    def sum_ints(self, values: list[int]) -> list[int]:
        """Each value summed over the ranks (host integers, over the gloo group)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, group=self.control)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """Whether any rank says yes (every rank gets the same answer)."""
        return bool(self.sum_ints([int(flag)])[0])

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place, on its device (no host read)."""
        if self.distributed:
            dist.all_reduce(t)
        return t

    def weighted_sum(self, metrics: dict[str, torch.Tensor | float], weight: float) -> dict[str, torch.Tensor | float]:
        """Σ_r weight_r · metric_r for each 0-d metric (one all-reduce for all of them): with
        weight_r = this rank's share of the items, the mean over every rank's items."""
        if not self.distributed or not metrics:
            return metrics
        names = list(metrics)
        stacked = torch.stack([torch.as_tensor(metrics[n], dtype=torch.float32, device=self.device) for n in names])
        stacked *= weight
        dist.all_reduce(stacked)
        return {n: stacked[i] for i, n in enumerate(names)}

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.control)

    def gather_ints(self, value: int) -> list[int]:
        """``value`` of every rank, in rank order."""
        if not self.distributed:
            return [value]
        out = [torch.zeros((), dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(out, torch.tensor(value, dtype=torch.int64), group=self.control)
        return [int(t) for t in out]


def evaluation_share(parallel: Parallel | None, n_batches: int) -> Iterator[tuple[int, bool]]:
    """This rank's part of an evaluation over ``n_batches`` batches shared by the ranks: (batch
    index, counted) per forward, batches r, r + N, r + 2N, ... for rank r. Every rank runs the same
    number of forwards, ⌈n / N⌉ (FSDP2 all-gathers inside each): a rank with no batch left in the
    last round runs batch 0 again and does not count it. The caller sums what it counted over the
    ranks (`Parallel.sum_`). One process: every batch, once."""
    rank, world = (parallel.rank, parallel.world) if parallel is not None else (0, 1)
    for first in range(0, n_batches, world):
        index = first + rank
        yield (index, True) if index < n_batches else (0, False)


def replica_bytes(model_config: Any, dtype: torch.dtype, quant: str) -> int:
    """The bytes of the weights one DDP rank holds whole: every tensor in ``dtype``, or with a
    quantized base the decoder-block linears in its format (`models.quantized.quantized_bytes`)."""
    from models.quantized import quantized_bytes, should_quantize
    from models.skeleton import meta_model

    element = torch.empty((), dtype=dtype).element_size()
    return sum(quantized_bytes(quant, *p.shape) if quant != "none" and should_quantize(name) else p.numel() * element
               for name, p in meta_model(model_config).named_parameters())


def check_replica_fits(model_config: Any, dtype: torch.dtype, quant: str, device_bytes: int) -> None:
    """DDP keeps the whole model on every GPU: refuse (pointing to FSDP2) a model whose weights
    alone exceed the GPU's memory, before anything is loaded."""
    need = replica_bytes(model_config, dtype, quant)
    if need > device_bytes:
        raise InputError(f"--distributed ddp (or auto) keeps the whole model on every GPU, and its weights alone "
                         f"({need / 2**30:,.1f} GiB) exceed this GPU's {device_bytes / 2**30:,.1f} GiB: use "
                         "--distributed fsdp to shard them over the ranks (tools.memory_plan --gpus N --strategy fsdp "
                         "predicts what fits)")


def _rank_device(device_flag: str, local_rank: int) -> torch.device:
    """Rank r's device: ``cuda:LOCAL_RANK`` (auto or cuda, where CUDA exists), else the CPU."""
    if device_flag == "cpu" or (device_flag == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if device_flag not in ("auto", "cuda"):
        raise InputError(f"--device {device_flag}: under torchrun each rank takes cuda:LOCAL_RANK; give --device "
                         "cuda (or auto), or cpu")
    if not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available on this machine")
    if local_rank >= torch.cuda.device_count():
        raise InputError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} GPU(s); start at "
                         "most that many processes per node")
    return torch.device("cuda", local_rank)


# ---------------------------------------------------------------------------- FSDP2

def quantized_bytes_as_parameters(model: nn.Module) -> int:
    """Each quantized linear's large buffers (NF4's packed codes, absmax and nested absmax, int8's
    codes and absmax, FP8's codes and scales) turned into frozen parameters, which FSDP2 shards
    and all-gathers as the format's bytes (`models.quantized.QuantizedLinear.hold_as_parameters`);
    NF4's code books and offset (a few bytes) stay replicated buffers. Returns how many were turned."""
    from models.quantized import QuantizedLinear

    return sum(m.hold_as_parameters() for m in model.modules() if isinstance(m, QuantizedLinear))


def shard_model(model: nn.Module) -> None:
    """FSDP2 over a `models.llama.LlamaForCausalLM`: each decoder block, then the root (embedding,
    final norm, head); ``hidden_states`` runs FSDP's hooks as ``forward`` does."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    quantized_bytes_as_parameters(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_method(model, "hidden_states")


def local_frozen_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the frozen decoder-block tensors this rank holds, their full size): the base
    weights (dense or NF4 bytes) of every block, sharded under FSDP2 (buffers count whole)."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if p.requires_grad or ".layers." not in f".{name}":
            continue
        local = p.to_local() if isinstance(p, DTensor) else p
        held += local.numel() * local.element_size()
        total += p.numel() * p.element_size()
    return held, total


def layout_report(parallel: Parallel, model: nn.Module, micro_batches_per_step: int,
                  batch_size: int) -> tuple[dict[str, Any], str]:
    """(metrics fields, one line for stderr) of the job: strategy, ranks, micro-batches per step and
    the frozen decoder-block bytes each rank holds (about 1/N each under FSDP2, all under DDP).
    A collective: every rank calls it."""
    held, total = local_frozen_bytes(model)
    per_rank = parallel.gather_ints(held)
    fields = {"strategy": parallel.strategy, "world_size": parallel.world, "base_bytes": total,
              "base_bytes_per_rank": per_rank, "micro_batches_per_step": micro_batches_per_step}
    line = (f"distributed: {parallel.strategy} over {parallel.world} ranks; each holds "
            f"{', '.join(f'{b / 2**20:,.1f}' for b in per_rank)} MiB of the {total / 2**20:,.1f} MiB of frozen "
            f"block weights; {micro_batches_per_step} micro-batches of --batch-size {batch_size} per step "
            f"({micro_batches_per_step // parallel.world} per rank)")
    return fields, line
