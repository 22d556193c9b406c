"""DPO through the same distributed code as SFT: 2 FSDP2 ranks give the one-process steps and
evaluations (tiny model)."""

from __future__ import annotations

import torch

from tests.distributed.launch import ROOT, metrics, run_single, run_torchrun, train_args
from tests.tolerances import assert_close

PREFS = ROOT / "examples" / "license_prefs.jsonl"


def test_dpo_on_two_ranks_gives_the_single_process_losses_and_metrics(tiny_model_dir, tmp_path):
    data, held_out = tmp_path / "prefs.jsonl", tmp_path / "held_out.jsonl"
    data.write_text("\n".join(PREFS.read_text().splitlines()[:12]) + "\n")
    held_out.write_text("\n".join(PREFS.read_text().splitlines()[12:15]) + "\n")  # 3 batches: ranks share them 2 + 1
    flags = dict(method="dpo", max_steps=3, batch_size=1, max_len=192, lr=5e-3, lora_r=4, seed=2, rpo_alpha=0.5,
                 adam_eps=1e-6, eval_data=held_out)
    run_single(train_args(tiny_model_dir, data, tmp_path / "one", grad_accum=4, **flags))
    run_torchrun(train_args(tiny_model_dir, data, tmp_path / "two", grad_accum=2, distributed="fsdp", **flags))
    one, two = metrics(tmp_path / "one", "train"), metrics(tmp_path / "two", "train")
    assert len(one) == len(two) == 3
    for name in ("loss", "nll_loss", "rewards/margins", "rewards/accuracies", "logps/chosen_per_token", "grad_norm"):
        assert_close(torch.tensor([r[name] for r in two], dtype=torch.float64),
                     torch.tensor([r[name] for r in one], dtype=torch.float64), torch.float32, name=name)
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    assert one[-1]["rewards/margins"] != 0  # the policy moved away from the reference
    evals_one, evals_two = metrics(tmp_path / "one", "eval"), metrics(tmp_path / "two", "eval")
    assert [r["pairs"] for r in evals_two] == [r["pairs"] for r in evals_one] == [3, 3]
    for name in ("loss", "eval/kl", "eval/rewards/margins", "eval/logps/chosen_per_token"):
        assert_close(torch.tensor([r[name] for r in evals_two], dtype=torch.float64),
                     torch.tensor([r[name] for r in evals_one], dtype=torch.float64), torch.float32, name=name)
    assert evals_one[-1]["eval/kl"] > 0
