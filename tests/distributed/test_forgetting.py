"""Issue 14 through the distributed code: 2 FSDP2 ranks mix in the replay samples one process mixes
in (assigned over the step's micro-batches of every rank), give its KL anchor and its retention
figures (the retention batches shared by the ranks and summed)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.distributed.launch import metrics, run_single, run_torchrun, train_args
from tests.tolerances import assert_close

ROOT_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_replay_kl_anchor_and_retention_on_two_ranks_equal_one_process(tiny_model_dir, tmp_path):
    lines = (ROOT_EXAMPLES / "general_text.jsonl").read_text().splitlines()
    retain, replay = tmp_path / "retain.jsonl", tmp_path / "replay.jsonl"
    retain.write_text("\n".join(lines[:5]) + "\n")
    replay.write_text("\n".join(lines[5:12]) + "\n")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((ROOT_EXAMPLES / "license_qa.jsonl").read_text().splitlines()[:16]) + "\n")
    flags = dict(max_steps=3, batch_size=1, max_len=96, lr=1e-2, lora_r=4, seed=5, lora_dropout=0.1, adam_eps=1e-6,
                 retain_data=retain, replay_data=replay, replay_ratio=0.3, kl_to_base=0.5, eval_every=2)
    run_single(train_args(tiny_model_dir, data, tmp_path / "one", grad_accum=4, **flags))
    run_torchrun(train_args(tiny_model_dir, data, tmp_path / "two", grad_accum=2, distributed="fsdp", **flags))
    one, two = metrics(tmp_path / "one", "train"), metrics(tmp_path / "two", "train")
    assert len(one) == len(two) == 3
    for name in ("replay/samples", "replay/tokens", "tokens"):
        assert [r[name] for r in two] == [r[name] for r in one]
    assert sum(r["replay/samples"] for r in one) == 5  # ⌊12 · 0.3 / 0.7⌋ of 12 training samples
    for name in ("loss", "replay/loss", "kl_to_base", "objective", "grad_norm"):
        assert_close(torch.tensor([r[name] for r in two], dtype=torch.float64),
                     torch.tensor([r[name] for r in one], dtype=torch.float64), torch.float32, name=name)
    evals_one, evals_two = metrics(tmp_path / "one", "eval"), metrics(tmp_path / "two", "eval")
    assert [r["step"] for r in evals_two] == [r["step"] for r in evals_one] == [0, 2, 3]
    assert [r["retain/tokens"] for r in evals_two] == [r["retain/tokens"] for r in evals_one]
    assert evals_two[0]["retain/kl"] == 0.0 and evals_one[-1]["retain/kl"] > 0
    for name in ("retain/loss", "retain/base_loss", "retain/loss_delta", "retain/kl"):
        assert_close(torch.tensor([r[name] for r in evals_two], dtype=torch.float64),
                     torch.tensor([r[name] for r in evals_one], dtype=torch.float64), torch.float32, name=name)
