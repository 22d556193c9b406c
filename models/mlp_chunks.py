"""A row-wise function over token chunks, each checkpointed: ``--mlp-chunk-tokens`` for the MLP.

The Llama MLP ``y = down(silu(gate(x)) · up(x))`` is row-wise: row n of y depends on row n of x
only. Over the flattened tokens x (N, H) (N = B·T) and chunks of C rows ([0, C), [C, 2C), …, the
last one shorter)

    y[a:b] = mlp(x[a:b])        y = cat(y[0:C], y[C:2C], …)        (N, H)

and the backward is the same per chunk: ∂x[a:b] = ∂mlp(x[a:b])/∂x · ∂y[a:b], and each LoRA
gradient is the sum over chunks of its chunk's gradient. Unchunked, the MLP's working set is its
(N, 2I) [gate | up], its (N, I) act and their gradients — two thirds of a recomputed Llama-3.1-8B
block at long context (I = 14,336 against H = 4,096). `in_token_chunks` makes it C rows:

* with autograd on, each chunk runs under a non-reentrant ``torch.utils.checkpoint``: its forward
  keeps only its input (a view of x, held for the recompute) and drops every tensor it saves;
  the chunk's backward recomputes it (C·2I, C·I tensors), runs its backward and frees them
  before the next chunk. Nested inside the block's own checkpoint (or the recompute of
  `models.offload`) this is PyTorch's nested checkpointing: the chunk inputs count as tensors
  the block saved. ``preserve_rng_state`` (the default) restores the CPU and device RNG states
  of the chunk's forward for its recompute, so LoRA dropout draws the same masks (or kernel
  seeds) there. The outputs are concatenated: N·H more in the forward, nothing in the backward
  (cat's backward hands each chunk a view of ∂y).
* with autograd off (the forward of an offloaded block: `models.offload` runs it inside an
  autograd Function), a plain loop writes each chunk into one preallocated (N, H) output, and
  draws the same random numbers in the same order as the checkpointed chunks.

What it costs: the MLP is computed once more per step (the chunk recompute; at long context the
attention's T² work dominates the step), a GEMM has C rows instead of N (C = 8k-16k keeps them
large), and the chunk inputs' gradients are concatenated (N·H) by the backward of the split.
NF4: every chunk dequantizes its weights again, in each pass (forward, the block's recompute,
the chunk's recompute: about 3 · N/C dequantizations per weight and step instead of 2; the
chunk's backward reuses its recompute's copy under `kernels.nf4.keep_dequantized`, the
``context_fn`` the caller passes). Dequantizing a weight reads it once and writes I·H values,
small against the C·I·H-sized GEMMs of a chunk. Dequantizing once per block pass instead would
need the dense weight to outlive the chunks it feeds, and a checkpointed forward would keep it
in its graph until the backward (one dense MLP per block).

Dropout: the masks are drawn per chunk (the CPU reference draws ``torch.rand`` over its input
rows; the Triton kernels seed each call), so with LoRA dropout a chunked step draws other masks
than an unchunked one — an equally valid draw, replayed exactly by every recompute. Without
dropout chunked and unchunked agree up to float summation order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def in_token_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk_tokens: int,
                    context_fn: Callable[[], tuple[Any, Any]] | None = None) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn``, over chunks of ``chunk_tokens`` flattened tokens of x.

    x (..., H_in) → (..., H_out); at most ``chunk_tokens`` tokens: ``fn(x)``. With autograd on, each chunk is a non-reentrant checkpoint
    (``context_fn`` as `torch.utils.checkpoint.checkpoint` takes it: the contexts of its forward
    and of its recompute); with it off, a loop into one preallocated output (module docstring).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])  # (N, H_in)
    if flat.shape[0] <= chunk_tokens:
        return fn(x)
    parts = flat.split(chunk_tokens)  # views: (C, H_in) each, the last one shorter
    if not torch.is_grad_enabled():
        out, start = None, 0
        for part in parts:
            y = fn(part)  # (c, H_out)
            if out is None:
                out = y.new_empty((flat.shape[0], y.shape[-1]))  # (N, H_out)
            out[start:start + part.shape[0]] = y
            start += part.shape[0]
        return out.view(*lead, out.shape[-1])
    kwargs = {} if context_fn is None else {"context_fn": context_fn}
    chunks = [checkpoint(fn, part, use_reentrant=False, **kwargs) for part in parts]
    y = torch.cat(chunks)  # (N, H_out)
    return y.view(*lead, y.shape[-1])
