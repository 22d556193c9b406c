"""GRPO through the same distributed code as SFT and DPO: 2 FSDP2 ranks sample the completions one
process samples (each micro-batch under its own generator) and give its steps and evaluations."""

from __future__ import annotations

import json

import torch

from tests.distributed.launch import metrics, run_single, run_torchrun, train_args
from tests.tolerances import assert_close

REWARD = '''
def short(prompts, completions, **columns):
    return [10.0 / (10 + len(c)) for c in completions]
'''


def test_grpo_on_two_ranks_gives_the_single_process_steps_and_evaluations(tiny_model_dir, tmp_path):
    data, held_out, reward = tmp_path / "prompts.jsonl", tmp_path / "held_out.jsonl", tmp_path / "reward.py"
    data.write_text("".join(json.dumps({"prompt": f"Count to {n}:"}) + "\n" for n in range(8)))
    held_out.write_text("".join(json.dumps({"prompt": f"Say {w}:"}) + "\n" for w in ("yes", "no", "maybe")))
    reward.write_text(REWARD)
    flags = dict(method="grpo", max_steps=3, batch_size=1, num_generations=3, max_completion_len=6, max_len=64,
                 lr=1e-2, lora_r=4, seed=2, beta=0.1, adam_eps=1e-3, eval_data=held_out, reward=f"{reward}:short")
    run_single(train_args(tiny_model_dir, data, tmp_path / "one", grad_accum=4, **flags))
    run_torchrun(train_args(tiny_model_dir, data, tmp_path / "two", grad_accum=2, distributed="fsdp", **flags))
    one, two = metrics(tmp_path / "one", "train"), metrics(tmp_path / "two", "train")
    assert len(one) == len(two) == 3
    for name in ("loss", "reward", "reward_std", "kl", "clip_ratio", "grad_norm", "completions/mean_length"):
        assert_close(torch.tensor([r[name] for r in two], dtype=torch.float64),
                     torch.tensor([r[name] for r in one], dtype=torch.float64), torch.float32, name=name)
    for name in ("completions/min_length", "completions/max_length", "tokens"):
        assert [r[name] for r in two] == [r[name] for r in one]
    assert one[-1]["kl"] > 0 and one[0]["grad_norm"] > 0  # the policy moved
    evals_one, evals_two = metrics(tmp_path / "one", "eval"), metrics(tmp_path / "two", "eval")
    assert [r["prompts"] for r in evals_two] == [r["prompts"] for r in evals_one] == [3, 3]
    for name in ("eval/reward", "eval/completions/mean_length"):
        assert_close(torch.tensor([r[name] for r in evals_two], dtype=torch.float64),
                     torch.tensor([r[name] for r in evals_one], dtype=torch.float64), torch.float32, name=name)
