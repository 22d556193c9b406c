"""Gradient checkpointing with the block inputs held in host memory: ``--offload-activations``.

With checkpointing, what a decoder block keeps between its forward and its backward is its input
x (B, T, H) in the compute dtype (the block is recomputed from it; everything inside is dropped).
For L blocks that is L·B·T·H elements on the device — at 342k tokens on Llama-3.1-8B, 32 ×
342,733 × 4096 × 2 bytes = 90 GB. `offloaded_checkpoint` keeps them in (pinned) CPU memory
instead: the device holds at most two block inputs at a time (the one being recomputed and the
one prefetched for the next backward).

One `torch.autograd.Function`, `_OffloadedBlock`, per block call:

* forward (autograd off): y = block(x, *args); x is copied into a host buffer of the
  `HostStash` shared by the blocks of one model forward. On CUDA the copy is
  ``non_blocking`` into pinned memory on a side stream that first waits for the compute stream
  (x is ready), and ``x.record_stream(side)`` tells the caching allocator that x's memory may
  not be reused before that copy ran — the next block computes meanwhile. The CPU and the CUDA
  RNG states of x's device are saved (as ``torch.utils.checkpoint`` does): LoRA dropout draws
  its masks or seeds from torch's generators, and the recompute must draw the same.
* backward (given dy = ∂L/∂y): x comes back from the stash (prefetched on the side stream by the
  backward of the block after it, else copied now; the compute stream waits for the copy's
  event), the next block down's input is prefetched, the RNG states are restored inside
  ``torch.random.fork_rng`` (the global generators are left as they were), the block is
  recomputed with autograd on and under `kernels.nf4.keep_dequantized` (each NF4 weight is then
  dequantized twice per step, forward and recompute: the contract of
  ``models.llama._recompute_keeps_dequantized``), and

      torch.autograd.backward(y', dy)

  over the recomputed y' = block(x'): ∂L/∂x' lands in x'.grad (returned as the Function's
  gradient of x), and the gradients of the block's trainable parameters θ (LoRA's A and B)
  accumulate into the ``.grad`` of the parameters the recompute used, once, as in any backward
  (hooks see them: DDP's all-reduce marks each parameter ready once). Under FSDP2 those are the
  block's all-gathered parameters, whose gradients FSDP2's own hooks reduce-scatter into the
  shards, which is why θ cannot be inputs of the Function (they would be the shards, which the
  recompute never touches). An empty leaf that requires grad (`_GRAD_ANCHOR`) is its input
  instead, so that its output requires grad even when x does not (the first block's input comes
  from a frozen embedding).

Non-tensor arguments (positions, rotary frequencies, a `DocumentLayout`, ``cache=None``) pass
through to the block in both calls. Autocast is re-entered in the recompute with the forward's
state (the engine itself runs without autocast).

On a CPU device the same code runs: the "offload" is a copy into a CPU tensor (pinned only when
the input is on CUDA), and the copy back is the identity. A backward may run once per forward
(``retain_graph`` a second time is refused: the host buffer is released when taken).

Why not a stock mechanism: ``torch.autograd.graph.save_on_cpu`` moves what autograd *saves*,
but the non-reentrant ``torch.utils.checkpoint`` keeps its inputs in the recompute closure,
where no saved-tensor hook reaches them; wrapped around the reentrant checkpoint it would reach
them, but that checkpoint takes no ``context_fn`` (no `keep_dequantized`), drops the gradients
of a block whose input does not require grad, and unpacks synchronously (no prefetch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kernels.nf4 import keep_dequantized

_SIDE_STREAMS: dict[torch.device, Any] = {}  # one copy stream per CUDA device, made once


def _side_stream(device: torch.device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class HostStash:
    """The block inputs of one model forward, in host memory, indexed in the order they were put.

    ``host[i]``: the CPU copy of block i's input (None once taken); on CUDA ``copied[i]`` is the
    event after its device-to-host copy and ``fetched[i]`` a (device tensor, event) prefetch.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = _side_stream(device) if self.cuda else None
        self.host: list[torch.Tensor | None] = []
        self.copied: list[Any] = []
        self.fetched: dict[int, tuple[torch.Tensor, Any]] = {}

    def put(self, x: torch.Tensor) -> int:
        """Copy x to host memory (asynchronously on CUDA); return its index."""
        if not self.cuda:
            self.host.append(x.detach().to("cpu", copy=True))
            self.copied.append(None)
            return len(self.host) - 1
        buffer = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # x has been computed
        with torch.cuda.stream(self.stream):
            buffer.copy_(x.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        x.record_stream(self.stream)  # x's memory is not reused before the copy has run
        self.host.append(buffer)
        self.copied.append(event)
        return len(self.host) - 1

    def prefetch(self, index: int) -> None:
        """Start bringing input ``index`` back to the device on the side stream (CUDA only)."""
        if not self.cuda or index < 0 or index in self.fetched or self.host[index] is None:
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.copied[index])
            x = self.host[index].to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.fetched[index] = (x, event)

    def take(self, index: int) -> torch.Tensor:
        """Input ``index`` on the device, ready for the compute stream; its host copy is released."""
        if self.host[index] is None:
            raise RuntimeError("backward through an offloaded checkpoint ran twice (retain_graph): its block "
                               "input was already brought back and released")
        if not self.cuda:
            x = self.host[index].to(self.device)
        else:
            self.prefetch(index)
            x, event = self.fetched.pop(index)
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            x.record_stream(current)  # allocated on the side stream, used on the compute stream
        self.host[index] = None
        return x


def _rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CPU generator state, the CUDA generator state of ``device`` or None)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class _OffloadedBlock(torch.autograd.Function):
    """y = run(x), with x held in a `HostStash` and the block recomputed in backward (module doc)."""

    @staticmethod
    def forward(ctx, stash: HostStash, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                *anchor: torch.Tensor) -> torch.Tensor:
        ctx.stash, ctx.run = stash, run
        ctx.rng = _rng_states(x.device)
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        y = run(x)  # autograd is off inside a Function's forward: nothing of the block is saved
        ctx.index = stash.put(x)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        stash = ctx.stash
        x = stash.take(ctx.index).detach().requires_grad_(ctx.needs_input_grad[2])
        stash.prefetch(ctx.index - 1)  # the next backward's input, overlapped with this recompute
        cpu_state, cuda_state = ctx.rng
        devices = [x.device] if cuda_state is not None else []
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), keep_dequantized(), \
                torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, x.device)
            y = ctx.run(x)
        torch.autograd.backward(y, dy)  # θ's gradients accumulate into the .grad of what the recompute used
        return (None, None, x.grad if ctx.needs_input_grad[2] else None, *(None for _ in ctx.needs_input_grad[3:]))


def offloaded_checkpoint(stash: HostStash, block: nn.Module, x: torch.Tensor, *args: Any) -> torch.Tensor:
    """``block(x, *args)`` checkpointed with x held in ``stash`` (host memory) until the backward.

    ``args`` are passed through unchanged to both the forward and the recompute; the gradient
    reaches x (if it requires grad) and every parameter of ``block`` that requires grad.
    """
    trains = any(p.requires_grad for p in block.parameters())
    return _OffloadedBlock.apply(stash, lambda inp: block(inp, *args), x, *([_GRAD_ANCHOR] if trains else []))


# An empty leaf that requires grad, given to `_OffloadedBlock` when its block has trainable
# parameters: the block's output then requires grad even when its input does not, so the backward
# reaches the block (the parameters themselves are not inputs of the Function; see the module doc).
_GRAD_ANCHOR = torch.empty(0, requires_grad=True)
