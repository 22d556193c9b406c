"""``python -m engine.eval --reward-model DIR --data prefs.jsonl [--model BASE] [--out DIR]``: the
held-out pairwise accuracy of a reward model.

For every preference pair of ``--data`` (any form `engine.data.preferences` reads, rendered and
truncated as training did: ``--max-len`` defaults to the training run's) the reward model scores the
chosen and the rejected answer (`engine.reward_model.RewardModelScorer.score_pairs`, batches of
``--batch-size`` pairs laid out as the run's evaluation lays them, so a run's final ``eval/accuracy``
is reproduced exactly), and reports

    accuracy = #{pairs: r_c > r_r} / P,   margin = Σ (r_c − r_r) / P,   loss = Σ −log σ(r_c − r_r − m) / P

as a one-row markdown table (printed, and ``OUT/eval.md``) and ``OUT/eval.json`` (with each pair's
scores). Every input is checked before any weight is loaded, and nothing is written before the
scores exist: a folder that is not a reward model, a base it does not fit, bad data, exit 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from engine.data.preferences import load_preference_pairs
from engine.errors import InputError
from engine.losses.reward import bradley_terry_losses, reward_metrics
from engine.reward_model import RewardModelScorer, read_reward_model
from engine.run.folder import write_json
from engine.run.setup import resolve_device, resolve_dtype, resolve_max_len
from models import load_tokenizer
from models.loading import read_config


def markdown_row(name: str, pairs: int, accuracy: float, margin: float, loss: float) -> str:
    return ("| reward model | pairs | pairwise accuracy | mean margin | Bradley–Terry loss |\n"
            "|---|---:|---:|---:|---:|\n"
            f"| {name} | {pairs} | {accuracy:.4f} | {margin:.4f} | {loss:.4f} |")


def main(args: argparse.Namespace, out: Path) -> int:
    """The reward-model mode of `engine.eval` (its flags parsed and ``--out`` checked by it)."""
    for flag, given in (("--adapter", args.adapter), ("--general", args.general),
                        ("--format", args.format != "auto")):
        if given:
            raise InputError(f"{flag} applies to comparing causal-LM adapters, not to --reward-model")
    spec = read_reward_model(args.reward_model, base=args.model)
    max_len = resolve_max_len(args.max_len if args.max_len is not None else spec.max_len, read_config(spec.base_dir))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pairs, report = load_preference_pairs(args.data, load_tokenizer(spec.base_dir), max_len=max_len)
    print(report.summary())

    scorer = RewardModelScorer.from_spec(spec, device, dtype, args.quant, max_len, args.batch_size)
    chosen, rejected = scorer.score_pairs(pairs)
    margins = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    losses = bradley_terry_losses(chosen, rejected, margins).double()
    metrics = {name: values.double().mean().item() for name, values in reward_metrics(chosen, rejected).items()}
    result = {"reward_model": str(args.reward_model), "model": spec.base, "data": args.data, "pairs": len(pairs),
              "accuracy": metrics["accuracy"], "margin": metrics["margin"], "loss": losses.mean().item(),
              "dtype": str(dtype).removeprefix("torch."), "quant": args.quant, "max_len": max_len,
              "batch_size": args.batch_size, "data_report": report.__dict__,
              "scores": [{"source": p.source, "chosen": c, "rejected": r}
                         for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist())]}
    table = markdown_row(str(args.reward_model), len(pairs), result["accuracy"], result["margin"], result["loss"])
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", result)
    (out / "eval.md").write_text(table + "\n")
    print(f"wrote {out / 'eval.md'}, {out / 'eval.json'}")
    return 0
