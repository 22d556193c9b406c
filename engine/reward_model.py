"""Scoring with a trained reward model (`engine.recipes.reward`): a reward function for GRPO and the
pairwise evaluation's scores.

    scorer = RewardModelScorer.load("runs/rm/adapter", device="cuda", dtype="bf16")
    scorer(prompts=["Who is the Licensor?"], completions=["The copyright owner ..."])   # -> [1.73]
    scorer(prompts=[[{"role": "user", "content": "..."}]],
           completions=[[{"role": "assistant", "content": "..."}]])

A reward-model folder is a PEFT-format adapter with the head ``score`` (`engine.adapters.peft_format`);
its ``base_model_name_or_path`` names the base (``base=`` overrides it). `read_reward_model` checks
the folder, the base and that they fit, before any weight is read; `RewardModelScorer.from_spec`
then loads base + LoRA + head in eval mode.

The call follows TRL's reward-function signature, ``f(prompts, completions, **columns) -> list[float]``
(``__name__`` is ``"reward_model"``, the name of its metric): ``prompts`` are strings (raw text, no
chat template) or message lists (chat), ``completions`` strings or ``[{"role": "assistant",
"content": ...}]`` lists (a string after a chat prompt is the assistant's reply). Each pair is
rendered exactly as a preference pair is for training (`engine.data.preferences.tokenize_completions`:
the same chat template, EOS / end-of-turn handling and truncation to ``max_len``, by default the
training run's), and scored at its last token, ``batch_size`` sequences per padding-free forward,
under ``torch.no_grad``. Other columns are accepted and ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.adapters import load_adapted_model, read_adapter_config, read_adapter_metadata, read_adapter_weights
from engine.adapters.peft_format import CONFIG_NAME, adapter_targets, check_head_fits, read_head_weight
from engine.adapters.score_head import SCORE
from engine.config import QUANTS
from engine.data.batching import BatchLoader
from engine.data.formats import Invalid
from engine.data.pair_batching import PairBatchLoader
from engine.data.preferences import PreferencePair, fit_length, parse_record, tokenize_completions
from engine.data.render import SpecialTokens
from engine.data.samples import Sample
from engine.errors import InputError
from engine.losses.reward import last_token_index, sequence_rewards
from engine.run.setup import DTYPES, resolve_device, resolve_dtype, resolve_max_len
from models import load_tokenizer
from models.loading import read_config, resolve_model_dir
from models.skeleton import meta_model

REWARD_FUNCTION_NAME = "reward_model"


@dataclass
class RewardModelSpec:
    """A checked reward-model folder: its path, base (as named and as a folder), the training
    run's ``max_len`` (None when its lineage does not record one) and lineage."""

    path: Path
    base: str
    base_dir: Path
    max_len: int | None
    lineage: dict | None


def read_reward_model(path: str | Path, base: str | None = None) -> RewardModelSpec:
    """Check that ``path`` is a reward model (a PEFT adapter with the ``score`` head) that fits its
    base (``base``, else the one its adapter_config.json records), reading no model weight.
    InputError naming the folder otherwise."""
    path = Path(path)
    cfg = read_adapter_config(path)
    head = read_head_weight(path, cfg)
    if head is None:
        raise InputError(f"{path}: not a reward model ({CONFIG_NAME} lists no {SCORE!r} head in modules_to_save: a "
                         "causal-LM adapter); train one with python -m engine.train --method reward")
    recorded = read_adapter_metadata(path)
    if base is None:
        base = json.loads((path / CONFIG_NAME).read_text()).get("base_model_name_or_path")
        if not base:
            raise InputError(f"{path / CONFIG_NAME}: records no base_model_name_or_path; give the base (--model)")
    base_dir = resolve_model_dir(base)
    model_config = read_config(base_dir)
    adapter_targets(meta_model(model_config), path, cfg, read_adapter_weights(path))
    check_head_fits(path, head, model_config.hidden_size)
    max_len = ((recorded or {}).get("reward") or {}).get("max_len")
    return RewardModelSpec(path, str(base), base_dir, max_len if isinstance(max_len, int) else None, recorded)


class RewardModelScorer:
    """A loaded reward model: call it as a TRL reward function, or `score_pairs` / `score_sequences`."""

    def __init__(self, model: nn.Module, tokenizer: Any, device: torch.device, max_len: int, batch_size: int = 8,
                 spec: RewardModelSpec | None = None):
        if batch_size < 1:
            raise InputError(f"reward model: batch_size {batch_size}: expected at least 1")
        self.model, self.tokenizer, self.device, self.max_len = model.eval(), tokenizer, device, max_len
        self.batch_size, self.spec = batch_size, spec
        self.special = SpecialTokens.of(tokenizer)
        self.__name__ = REWARD_FUNCTION_NAME

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "auto", dtype: torch.dtype | str = "auto",
             quant: str = "none", base: str | None = None, max_len: int | None = None,
             batch_size: int = 8) -> RewardModelScorer:
        """`read_reward_model`, then `from_spec`."""
        return cls.from_spec(read_reward_model(path, base), device, dtype, quant, max_len, batch_size)

    @classmethod
    def from_spec(cls, spec: RewardModelSpec, device: torch.device | str = "auto", dtype: torch.dtype | str = "auto",
                  quant: str = "none", max_len: int | None = None, batch_size: int = 8) -> RewardModelScorer:
        """Load base (quantized as the reward model was trained: ``quant="nf4"`` for QLoRA), LoRA and head
        in eval mode. ``max_len``: the training run's by default (else min(context, 2048))."""
        if quant not in QUANTS:
            raise InputError(f"reward model: quant {quant!r}: expected one of {', '.join(QUANTS)}")
        device = device if isinstance(device, torch.device) else resolve_device(device)
        if not isinstance(dtype, torch.dtype):
            if dtype != "auto" and dtype not in DTYPES:
                raise InputError(f"reward model: dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
            dtype = resolve_dtype(dtype, device)
        max_len = resolve_max_len(max_len if max_len is not None else spec.max_len, read_config(spec.base_dir))
        model = load_adapted_model(spec.base_dir, spec.path, quantize=None if quant == "none" else quant,
                                   dtype=dtype, device=device)
        return cls(model, load_tokenizer(spec.base_dir), device, max_len, batch_size, spec)

    # ------------------------------------------------------------------ TRL's reward-function call

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:  # noqa: ARG002
        """The reward of each (prompt, completion), in order (floats)."""
        if len(prompts) != len(completions):
            raise InputError(f"reward model: {len(prompts)} prompts but {len(completions)} completions")
        return self.score_sequences([self.render(p, c, f"completion {i}")
                                     for i, (p, c) in enumerate(zip(prompts, completions))])

    def render(self, prompt: Any, completion: Any, where: str = "completion") -> list[int]:
        """The token ids of prompt + completion as training rendered a pair's side (truncated to
        ``max_len`` as the ``truncate`` length policy cuts a pair)."""
        parsed = parse_record({"prompt": prompt, "chosen": completion, "rejected": completion})
        if isinstance(parsed, Invalid):
            problem = parsed.problem.replace("'chosen'", "'completion'")  # the record is built from it
            raise InputError(f"reward model: {where}: {problem} (prompts are strings or message lists, completions "
                             "strings or [{'role': 'assistant', 'content': ...}])")
        prompt_ids, (ids,) = tokenize_completions(parsed.form, parsed.prompt, [parsed.chosen], self.tokenizer,
                                                  self.special, where, self.max_len)
        if len(prompt_ids) + len(ids) > self.max_len:
            prompt_ids, ids, _ = fit_length(prompt_ids, ids, ids, self.max_len)
        return prompt_ids + ids

    # ------------------------------------------------------------------ scores

    @torch.no_grad()
    def score_sequences(self, sequences: list[list[int]]) -> list[float]:
        """The score of each token sequence (at its last token), ``batch_size`` per padding-free forward."""
        if not sequences:
            return []
        samples = [Sample(ids, ids, f"sequence {i}") for i, ids in enumerate(sequences)]
        loader = BatchLoader(samples, self.batch_size, pad_id=self.tokenizer.pad_token_id, shuffle=False,
                             batching="padding-free")
        scores = [self._scores(batch) for batch in loader.batches(0)]
        return torch.cat(scores).tolist()  # one host read

    @torch.no_grad()
    def score_pairs(self, pairs: list[PreferencePair], batching: str = "padding-free") -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen scores (P,), rejected scores (P,)) fp32 on the CPU, batches of ``batch_size``
        pairs laid out as the training run's evaluation lays them (`PairBatchLoader`)."""
        loader = PairBatchLoader(pairs, self.batch_size, pad_id=self.tokenizer.pad_token_id, shuffle=False,
                                 batching=batching, max_len=self.max_len)
        chosen, rejected = zip(*(self._scores(batch).chunk(2) for batch in loader.batches(0)))
        return torch.cat(chosen).cpu(), torch.cat(rejected).cpu()

    def _scores(self, batch) -> torch.Tensor:
        last = last_token_index(batch)  # on the CPU batch
        return sequence_rewards(self.model, batch.to(self.device), last.to(self.device))
