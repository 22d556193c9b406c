"""Batched sampling with the KV cache: one completion per prompt, every row decoded together (GRPO).

    generator = sampling_generator(cfg.seed, step, device)
    completions = sample_completions(model, [p for p in prompts for _ in range(G)], max_new_tokens=256,
                                     temperature=1.0, top_p=1.0, eos_token_ids=eos, generator=generator,
                                     pad_id=tokenizer.pad_token_id)

Layout. The B prompts are LEFT-padded with ``pad_id`` to a (B, P) batch with an attention mask, so
that the last column holds every row's last prompt token and each new token is appended in the
same column for all rows. `models.llama.KVCache` keeps the padding out of attention (``key_real``)
and gives each row its own RoPE positions (``next_position``: the count of its real tokens), so a
left-padded row computes what the prompt alone would: real tokens at positions 0 … n-1 and the
new tokens after them; a sliding window is counted in cache slots, and a row's real tokens are
contiguous slots, so it bites at the same tokens too. The cache holds (B, n_kv, P + N, hd) keys and
values per layer (N = ``max_new_tokens``).

Steps. Prefill runs the prompts once (``model.hidden_states``) and takes the LM head on the last
column only ((B, H) → (B, V): no (B, P, V) logits). Then one token per step for every row; a
``finished`` (B,) mask stays on the device: a row that sampled an EOS id emits ``pad_id`` from then
on, which is not part of its completion. Decoding stops after N tokens, or once every row is
finished; that needs a host read, done every ``check_every`` steps only. Extra steps change no
completion (a finished row's tokens are discarded; an unfinished row's tokens do not depend on
when the check happens), only how much of the generator the call consumes.

Sampling, row by row as `engine.generate.sample_next` (which calls `sample_next_tokens`):
temperature 0 is argmax; else p = softmax(logits / T); with top_p < 1 the nucleus is found by a
sort (token k kept iff the mass before it, in decreasing order, is below top_p: the top-1 always
is) and the mask scattered back; then ONE ``torch.multinomial`` over the (B, V) rows in vocabulary
order with the given generator (deterministic given its state; drawing over the sorted order would
let rounding-level changes reorder near-equal probabilities and change the token).

The model runs in eval mode (no LoRA dropout) and every module gets its mode back afterwards. Only
``model.hidden_states`` and ``model.lm_head`` are called, so LoRA-injected (`engine.adapters`),
NF4 (`models.quantized`), DDP-routed and FSDP2-sharded models all work; under FSDP2 every rank
must run the same number of forwards, so pass ``all_finished`` that agrees across the ranks (e.g.
``lambda done: not parallel.any(not bool(done.all()))``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from engine.run.distributed import micro_batch_seed

_SAMPLING_SALT = 0x5DEECE66D  # keeps the sampling seeds apart from the dropout seeds of micro_batch_seed


def sampling_generator(seed: int, step: int, device: torch.device | str, part: int = 0) -> torch.Generator:
    """A generator on ``device`` seeded from (seed, step, part) alone, so that a resumed run samples
    at step ``step`` exactly what the uninterrupted run did, without saving any RNG state.

    ``part``: which of a step's sampling calls (e.g. the micro-batch's index in the step's global
    order, so that the draws do not depend on the number of ranks); distinct (step, part) give
    distinct seeds for part < 1_000_003 (`engine.run.distributed.micro_batch_seed`)."""
    mixed = (micro_batch_seed(seed, step, part) ^ _SAMPLING_SALT) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)


def sample_next_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                       generator: torch.Generator | None) -> torch.Tensor:
    """(B,) int64 next tokens from logits (B, V), each row as `engine.generate.sample_next` does:
    argmax when temperature <= 0, else nucleus sampling from softmax(logits / T), one multinomial
    draw per row."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        kept = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p  # the nucleus; keeps the top-1
        probs = probs * torch.zeros_like(kept).scatter(-1, order, kept)  # back in vocabulary order
    # drawn over the vocabulary order, never the sorted one: near-equal probabilities swap places in
    # a sort under rounding-level changes (another GEMM path, another rank count), which would map
    # the same random number to another token
    return torch.multinomial(probs / probs.sum(dim=-1, keepdim=True), 1, generator=generator)[:, 0]


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids (B, P), attention_mask (B, P) or None when no row is padded): prompts right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    padded = any(len(p) < width for p in prompts)  # known on the host: the model need not check
    return ids.to(device), mask.to(device) if padded else None


def _last_logits(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor:
    """(B, V) logits of the last column: the LM head on that position only."""
    hidden = model.hidden_states(ids, attention_mask=attention_mask, cache=cache)  # (B, T, H)
    return model.lm_head(hidden[:, -1:])[:, 0]  # (B, V)


@torch.no_grad()
def sample_completions(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                       top_p: float, eos_token_ids: Iterable[int], generator: torch.Generator | None, pad_id: int,
                       check_every: int = 8,
                       all_finished: Callable[[torch.Tensor], bool] | None = None) -> list[list[int]]:
    """One completion per prompt (the caller repeats a prompt for several), all rows decoded together.

    Each completion has at most ``max_new_tokens`` tokens and ends with its EOS id if it sampled
    one (nothing after it). ``check_every``: decode steps between the host reads of "every row
    finished" (results do not depend on it); ``all_finished(finished (B,) bool) -> bool`` replaces
    that read (under FSDP2, an agreement of all ranks). See the module docstring.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError(f"prompt {next(i for i, p in enumerate(prompts) if not p)} is empty: nothing to "
                         "condition a completion on")
    if max_new_tokens < 1 or check_every < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}, check_every={check_every}: expected >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: expected 0 < top_p <= 1")
    if not 0 <= pad_id < model.config.vocab_size:
        raise ValueError(f"pad_id={pad_id}: expected a token id in [0, {model.config.vocab_size})")
    all_finished = all_finished or (lambda done: bool(done.all()))
    device = model.model.embed_tokens.weight.device
    B = len(prompts)
    ids, attention_mask = left_padded(prompts, pad_id, device)  # (B, P)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        cache = model.new_cache(batch_size=B, max_len=ids.shape[1] + max_new_tokens)
        logits = _last_logits(model, ids, attention_mask, cache)  # prefill
        tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)  # tokens of each completion
        for t in range(max_new_tokens):
            token = sample_next_tokens(logits, temperature, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            tokens[:, t] = token
            lengths += (~finished).long()
            finished |= torch.isin(token, eos)
            if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and all_finished(finished)):
                break
            logits = _last_logits(model, token[:, None], None, cache)  # (B, V)
    finally:
        for module, training in modes:
            module.training = training
    return [row[:n] for row, n in zip(tokens[:, :t + 1].tolist(), lengths.tolist())]  # one copy to the host
