"""The reward model through the same distributed code: 2 ranks (DDP, and FSDP2 with the head in the
root module) give the one-process steps and evaluations, the head's gradient reduced with LoRA's."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import ROOT, adapter, metrics, run_single, run_torchrun, train_args
from tests.tolerances import assert_close

PREFS = ROOT / "examples" / "license_prefs.jsonl"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_reward_model_on_two_ranks_gives_the_single_process_steps(tiny_model_dir, tmp_path, strategy):
    data, held_out = tmp_path / "prefs.jsonl", tmp_path / "held_out.jsonl"
    data.write_text("\n".join(PREFS.read_text().splitlines()[:8]) + "\n")
    held_out.write_text("\n".join(PREFS.read_text().splitlines()[8:11]) + "\n")
    flags = dict(method="reward", max_steps=3, batch_size=1, max_len=192, lr=1e-2, lora_r=4, seed=2,
                 adam_eps=1e-3, eval_data=held_out)
    run_single(train_args(tiny_model_dir, data, tmp_path / "one", grad_accum=4, **flags))
    run_torchrun(train_args(tiny_model_dir, data, tmp_path / "two", grad_accum=2, distributed=strategy, **flags))
    one, two = metrics(tmp_path / "one", "train"), metrics(tmp_path / "two", "train")
    assert len(one) == len(two) == 3
    for name in ("loss", "accuracy", "margin", "grad_norm"):
        assert_close(torch.tensor([r[name] for r in two], dtype=torch.float64),
                     torch.tensor([r[name] for r in one], dtype=torch.float64), torch.float32, name=name)
    evals_one, evals_two = metrics(tmp_path / "one", "eval"), metrics(tmp_path / "two", "eval")
    assert [r["pairs"] for r in evals_two] == [r["pairs"] for r in evals_one] == [3, 3]
    for name in ("loss", "eval/accuracy", "eval/margin"):
        assert_close(torch.tensor([r[name] for r in evals_two], dtype=torch.float64),
                     torch.tensor([r[name] for r in evals_one], dtype=torch.float64), torch.float32, name=name)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert a.keys() == b.keys() and any("score" in k for k in a)
    for key in a:  # the head moved alike on both: its gradient was reduced over the ranks
        assert_close(b[key], a[key], torch.float32, name=key)
