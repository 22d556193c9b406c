"""The padding-free case of the training benchmark: real SFT samples, padded vs padding-free.

Samples: every record of ``examples/license_qa.jsonl`` rendered with the SmolLM2 tokenizer and
chat template (`engine.data.samples.load_samples`: prompt masked, labels on the answer), so the
length mix is that file's (122 samples, 69 to 106 tokens, mean 84). Round r takes the next
``per_step`` samples of a seeded permutation (cycling), and every provider gets the same samples
in the same round, laid out its own way:

* ``padded`` (B, T_max): right padding to the longest sample, attention_mask 0 and labels -100 on
  padding (`engine.data.batching.collate_padded`, the trainer's padded batches);
* ``padding_free`` (1, Σ L): the samples concatenated in one row, ``segment_ids`` 0, 1, ... per
  sample, positions restarting at 0 in each, no padding; a sample's first token is never a label
  (its label is -100 from rendering, and the loss masks every segment boundary:
  `engine.losses.causal_lm.shifted_labels`).

Providers: ``ours_padded`` and ``ours_padding_free`` (our model and SFT step on each layout) and
``hf_peft_padded`` (transformers + PEFT on the padded batch, as a user gets it by default). They
run interleaved, one step each per round, so that the load of a shared machine hits all alike.
Tokens per second count real (non-pad) tokens only: the same work for every provider.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from bench.train_providers import Case, Provider, build_hf, build_ours, time_step
from engine.data.batching import Batch, collate_padded, epoch_order
from engine.data.samples import Sample, load_samples
from models.tokenizer import load_tokenizer

SAMPLES_FILE = Path(__file__).resolve().parent.parent / "examples" / "license_qa.jsonl"
LAYOUTS = ("padded", "padding_free")
MIX_PROVIDERS: dict[str, tuple[Callable[[Case], Provider], str]] = {
    "ours_padded": (build_ours, "padded"), "ours_padding_free": (build_ours, "padding_free"),
    "hf_peft_padded": (build_hf, "padded")}
# (numerator, denominator): "numerator's real tokens/s over the denominator's".
MIX_RATIOS = (("ours_padding_free", "ours_padded"), ("ours_padding_free", "hf_peft_padded"),
              ("ours_padded", "hf_peft_padded"))


def mix_samples(model_dir: str | Path, path: Path = SAMPLES_FILE) -> list[Sample]:
    """The rendered samples of ``path`` (chat template and tokenizer of ``model_dir``)."""
    samples, _report = load_samples(path, load_tokenizer(model_dir))
    return samples


def padded_batch(samples: list[Sample], pad_id: int, index: int = 0) -> Batch:
    """(B, T_max) right-padded, the trainer's padded layout."""
    return Batch(**collate_padded(samples, pad_id), sample_ids=[[i] for i in range(len(samples))],
                 epoch=0, index=index)


def padding_free_batch(samples: list[Sample], index: int = 0) -> Batch:
    """(1, Σ L): the samples end to end in one row, a segment id each, positions restarting at 0."""
    as_row = lambda xs: torch.tensor(xs, dtype=torch.long)[None]  # noqa: E731  (1, N)
    ids = [t for s in samples for t in s.input_ids]
    return Batch(input_ids=as_row(ids), labels=as_row([t for s in samples for t in s.labels]),
                 attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                 position_ids=as_row([p for s in samples for p in range(len(s.input_ids))]),
                 segment_ids=as_row([k for k, s in enumerate(samples) for _ in s.input_ids]),
                 sample_ids=[list(range(len(samples)))], epoch=0, index=index)


def round_samples(samples: list[Sample], per_step: int, rounds: int, seed: int = 0) -> list[list[Sample]]:
    """``rounds`` groups of ``per_step`` samples: consecutive slices of a seeded permutation, cycling."""
    order = epoch_order(len(samples), seed, 0)
    return [[samples[order[(r * per_step + k) % len(order)]] for k in range(per_step)] for r in range(rounds)]


def layout(samples: list[Sample], name: str, pad_id: int, index: int) -> Batch:
    return padded_batch(samples, pad_id, index) if name == "padded" else padding_free_batch(samples, index)


def run_mix(case: Case, per_step: int, warmup: int, steps: int, pad_id: int, seed: int = 0,
            providers: dict[str, tuple[Callable[[Case], Provider], str]] = MIX_PROVIDERS) -> list[dict]:
    """Every provider in memory; each round, one step each on that round's samples. One row per
    provider: real tokens and laid-out tokens (padding included) per measured step, step times,
    ``tokens_per_s`` = Σ real tokens / Σ seconds over the measured rounds."""
    groups = round_samples(mix_samples(case.model_dir), per_step, warmup + steps, seed)
    built = {name: build(case) for name, (build, _) in providers.items()}
    rows = {name: {"case": case.name, "provider": name, "layout": providers[name][1], "samples_per_step": per_step,
                   "real_tokens": [], "laid_out_tokens": [], "step_times_s": [], "losses": []} for name in built}
    for r, group in enumerate(groups):
        for name, provider in built.items():
            batch = layout(group, providers[name][1], pad_id, r)
            seconds, loss = time_step(provider, provider.prepare(batch), case.device)
            print(f"  {case.name} {name} round {r}: {seconds:.2f} s, loss {float(loss):.4f}", flush=True)
            if r >= warmup:
                row = rows[name]
                row["real_tokens"].append(sum(len(s.input_ids) for s in group))
                row["laid_out_tokens"].append(batch.input_ids.numel())
                row["step_times_s"].append(round(seconds, 4))
                row["losses"].append(round(float(loss), 5))
    for row in rows.values():
        row["tokens_per_s"] = round(sum(row["real_tokens"]) / sum(row["step_times_s"]), 2)
        row["padding_share"] = round(1 - sum(row["real_tokens"]) / sum(row["laid_out_tokens"]), 4)
    return list(rows.values())


def mix_ratios(rows: list[dict], pairs=MIX_RATIOS) -> dict[str, dict]:
    """For each (a, b) of ``pairs``: a's real tokens/s over b's (``tokens_per_s``), and the median of
    the per-round ratios t_b / t_a (rounds are interleaved: the same load and the same samples)."""
    by_name = {r["provider"]: r for r in rows}
    out = {}
    for a, b in pairs:
        if a not in by_name or b not in by_name:
            continue
        per_round = [tb / ta for ta, tb in zip(by_name[a]["step_times_s"], by_name[b]["step_times_s"])]
        out[f"{a}_over_{b}"] = {"tokens_per_s": round(by_name[a]["tokens_per_s"] / by_name[b]["tokens_per_s"], 3),
                                "median_of_rounds": round(statistics.median(per_round), 3),
                                "per_round": [round(x, 3) for x in per_round]}
    return out
