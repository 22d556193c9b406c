"""``python -m engine.eval --model BASE [--adapter A ...] --data prompts.jsonl --reward SPEC ...``:
the mean reward of each model's greedy completions on held-out prompts (a GRPO run's measure).

For the base and each adapter (switched over the base loaded once, `engine.adapters.switcher`):
one greedy completion of at most ``--max-completion-len`` tokens per prompt of ``--data`` (prompt-only
records as `engine.data.prompts` reads them; chat prompts through the chat template), decoded in
batches of ``--batch-size`` prompts with the KV cache (`engine.sampling.sample_completions`), scored
by the reward functions (`engine.rewards`, with the records' other fields as columns):

    reward = Σ_i Σ_f w_f · r_f,i / P,      rewards/f = Σ_i r_f,i / P   over the P prompts

A markdown table (printed, and ``OUT/eval.md``: one row per model, the mean reward, each function's
mean, the mean completion length, the change of the reward against the base) and ``OUT/eval.json``
(with every completion and its rewards). Inputs are checked before any weight is loaded; nothing is
written before the table exists.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from engine.adapters.switcher import base_then_adapters
from engine.comparison import read_adapters
from engine.data.prompts import PromptLoader, load_prompt_data
from engine.errors import InputError
from engine.recipes.grpo import check_columns
from engine.recipes.grpo_rollout import score_completions
from engine.rewards import load_reward_functions
from engine.run.folder import write_json
from engine.run.setup import resolve_device, resolve_dtype, resolve_max_len
from engine.sampling import sample_completions
from models import load_model, load_tokenizer
from models.loading import read_config, resolve_model_dir

BASE = "base"


def markdown_table(rows: list[dict], names: list[str]) -> str:
    header = ["model", "mean reward", *(f"{n}" for n in names), "mean length", "Δ reward vs base"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        delta = "—" if row is rows[0] else f"{row['reward'] - rows[0]['reward']:+.4f}"
        cells = [row["name"], f"{row['reward']:.4f}", *(f"{row['rewards'][n]:.4f}" for n in names),
                 f"{row['mean_length']:.1f}", delta]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def score_model(model, tokenizer, samples, rewards, *, batch_size: int, max_new_tokens: int, eos_ids: set[int],
                desc: str, progress: bool) -> dict:
    """One greedy completion per prompt, scored: the row's means and every completion."""
    loader = PromptLoader(samples, batch_size, shuffle=False)
    completions, totals, per_function = [], [], {name: [] for name in rewards.names}
    for prompts in tqdm(list(loader.batches(0)), desc=desc, unit="batch", disable=not progress, leave=False):
        ids = sample_completions(model, prompts.prompt_ids, max_new_tokens=max_new_tokens, temperature=0.0,
                                 top_p=1.0, eos_token_ids=eos_ids, generator=None, pad_id=tokenizer.pad_token_id)
        texts, scores = score_completions(rewards, tokenizer, prompts.samples, ids)
        for i, sample in enumerate(prompts.samples):
            completions.append({"prompt": sample.source, "completion": texts[i], "tokens": len(ids[i]),
                                "reward": float(scores.total[i]),
                                **{f"rewards/{k}": float(v[i]) for k, v in scores.per_function.items()}})
        totals += scores.total.tolist()
        for name, values in scores.per_function.items():
            per_function[name] += values.tolist()
    n = len(totals)
    return {"reward": sum(totals) / n, "rewards": {k: sum(v) / n for k, v in per_function.items()},
            "mean_length": sum(c["tokens"] for c in completions) / n, "prompts": n, "completions": completions}


def main(args: argparse.Namespace, out: Path) -> int:
    """The prompt-reward mode of `engine.eval` (its flags parsed and ``--out`` checked by it)."""
    for flag, given in (("--general", args.general), ("--format", args.format != "auto")):
        if given:
            raise InputError(f"{flag} applies to comparing losses, not to --reward (prompts and their rewards)")
    if args.max_completion_len < 1:
        raise InputError(f"--max-completion-len {args.max_completion_len}: expected at least 1")
    rewards = load_reward_functions(args.reward, args.reward_weights)
    model_dir = resolve_model_dir(args.model)
    config = read_config(model_dir)
    max_len = resolve_max_len(args.max_len, config)
    room = max_len - args.max_completion_len
    if room < 2:
        raise InputError(f"--max-len {max_len} leaves {room} tokens for the prompt with --max-completion-len "
                         f"{args.max_completion_len}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    adapters = read_adapters(args.adapter, model_dir)
    tokenizer = load_tokenizer(model_dir)
    data = load_prompt_data(args.data, tokenizer, max_prompt_len=room)
    check_columns(data, rewards.required_columns())
    print(data.train_report.summary())

    model = load_model(model_dir, dtype=dtype, device=device, quantize=None if args.quant == "none" else args.quant)
    eos_ids = set(config.eos_token_ids) | set(tokenizer.eos_token_ids)
    rows = []
    for name in base_then_adapters(model, adapters, BASE):
        row = score_model(model, tokenizer, data.train, rewards, batch_size=args.batch_size,
                          max_new_tokens=args.max_completion_len, eos_ids=eos_ids, desc=name,
                          progress=not args.no_progress)
        rows.append({"name": name, **row})

    table = markdown_table(rows, rewards.names)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", {"model": args.model, "data": args.data, "rewards": rewards.names,
                                   "reward_weights": rewards.weights, "adapters": args.adapter,
                                   "max_completion_len": args.max_completion_len, "decoding": "greedy",
                                   "dtype": str(dtype).removeprefix("torch."), "quant": args.quant, "rows": rows})
    (out / "eval.md").write_text(table + "\n")
    print(f"wrote {out / 'eval.md'}, {out / 'eval.json'}")
    return 0
