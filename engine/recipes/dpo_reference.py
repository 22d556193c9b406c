"""DPO's reference policy π_ref on the training model itself, never a second copy of the weights.

* a fresh adapter: π_ref is the base model, i.e. the same model inside
  `engine.adapters.disable_adapters` (every adapter module computes its frozen base only);
* ``--init-adapter DIR`` (continued training, e.g. DPO after SFT): π_ref is the starting policy,
  base + the initial adapter, frozen. Its adapter tensors (LoRA's A, B) are kept as frozen copies (adapter-sized,
  no base weights) and copied into the live adapter parameters under ``torch.no_grad`` for the reference
  forward, the trained values being copied back bitwise right after. This happens before the
  policy forward of each micro-batch, so no autograd graph ever sees the swap.

`precompute_reference` scores every pair with π_ref once (``--precompute-ref``): a (pairs, 2)
table [chosen, rejected] per split, saved in checkpoints so a resumed run uses the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from tqdm import tqdm

from engine.adapters import adapter_params, disable_adapters
from engine.data.batching import Batch
from engine.data.preferences import PairBatchLoader, PreferencePair
from engine.losses.causal_lm import completion_logps, hidden_states


class ReferencePolicy:
    """π_ref on the training model itself: adapters off, or the frozen initial adapter swapped in."""

    def __init__(self, model: torch.nn.Module, frozen_initial: bool):
        self.model = model
        self.initial = None
        if frozen_initial:  # copies of the adapter's tensors only (LoRA: r·(in + out) per adapted linear)
            self.initial = _copies(adapter_params(model))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.initial is None:
            with disable_adapters(self.model):
                yield
            return
        params = adapter_params(self.model)
        trained = _copies(params)
        _assign(params, self.initial)
        try:
            yield
        finally:
            _assign(params, trained)

    @torch.no_grad()
    def logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """`completion_logps` of π_ref, in eval mode (no dropout, no RNG drawn)."""
        with self._evaluating():
            return completion_logps(self.model, batch)

    @torch.no_grad()
    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """π_ref's final hidden states (B, T, H) of the batch, in eval mode."""
        with self._evaluating():
            return hidden_states(self.model, batch)

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.active():
                yield
        finally:
            self.model.train(was_training)


def precompute_reference(reference: ReferencePolicy, pairs: list[PreferencePair], batch_size: int, pad_id: int,
                         device: torch.device, desc: str, progress: bool, batching: str = "padded",
                         max_len: int | None = None) -> torch.Tensor:
    """π_ref's log-probs of every pair: (pairs, 2) fp32 on the CPU, columns [chosen, rejected],
    scored in batches of ``batch_size`` pairs laid out as ``batching`` (the training layout; the
    numbers are those of an on-the-fly reference up to float rounding, whatever pairs share a batch)."""
    loader = PairBatchLoader(pairs, batch_size, pad_id=pad_id, shuffle=False, batching=batching, max_len=max_len)
    table = torch.empty(len(pairs), 2, dtype=torch.float32)
    for batch in tqdm(loader.batches(0), total=loader.num_batches(0), disable=not progress, desc=desc,
                      leave=False):
        logps, _ = reference.logps(batch.to(device))  # (2B,) documents [c_1 … c_B, r_1 … r_B]
        half = logps.shape[0] // 2
        owners = [pair for row in batch.sample_ids for pair in row]
        table[owners[:half]] = torch.stack([logps[:half], logps[half:]], 1).cpu()
    return table


def _copies(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


@torch.no_grad()
def _assign(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for name, value in values.items():
        params[name].copy_(value)
