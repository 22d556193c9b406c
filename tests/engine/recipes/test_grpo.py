"""The GRPO trainer: completion log-probs are those of the logits, a run logs TRL's metrics and
every completion, resume is exact (also between the iterations of one batch of completions), the
reference is the same weights, and a failing reward function stops the run with exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.adapters import LoRAConfig, inject_lora, set_trainable
from engine.config import TrainConfig
from engine.data.prompts import PromptLoader, load_prompt_data
from engine.errors import InputError
from engine.recipes import grpo
from engine.recipes.dpo_reference import ReferencePolicy
from engine.recipes.grpo_rollout import Rollouts, SamplingOptions, token_logps
from engine.rewards import RewardError, load_reward_functions
from engine.run.metrics import read_metrics
from models import load_model, load_tokenizer
from tests.tolerances import assert_close

REWARDS = '''
def short(prompts, completions, **columns):
    """Higher for shorter texts: a reward a random model's completions get in varied amounts."""
    return [10.0 / (10 + len(c[0]["content"])) for c in completions]

def broken(prompts, completions, **columns):
    raise ValueError("no sevens")

CALLS = []

def late(prompts, completions, **columns):
    """Fails from its fifth call on: mid-run, after steps were trained."""
    CALLS.append(1)
    if len(CALLS) >= 5:
        raise KeyError("answer")
    return [0.5] * len(completions)

def none_for_all(prompts, completions, **columns):
    return [None] * len(completions)

def too_few(prompts, completions, **columns):
    return [1.0]
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    """Six chat prompts with an ``answer`` column, two held out, and a file of reward functions."""
    out = tmp_path_factory.mktemp("grpo")
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": a + b}
            for a, b in ((2, 3), (4, 4), (5, 1), (3, 6), (7, 2), (1, 8))]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    (out / "rewards.py").write_text(REWARDS)
    return {"train": out / "train.jsonl", "eval": out / "eval.jsonl", "rewards": out / "rewards.py"}


def grpo_config(model_dir: Path, task: dict[str, Path], output: Path, **overrides) -> TrainConfig:
    values = dict(method="grpo", model=str(model_dir), data=str(task["train"]), eval_data=str(task["eval"]),
                  output=str(output), reward=[f"{task['rewards']}:short", "regex:[aeiou]"], reward_weights=[1.0, 0.5],
                  max_steps=4, batch_size=1, grad_accum=2, num_generations=3, max_completion_len=6, lr=1e-2,
                  warmup_steps=1, max_len=96, lora_r=4, lora_alpha=8, seed=5, beta=0.1, eval_every=0, save_every=0)
    values.update(overrides)
    return TrainConfig(**values)


def lines(output: Path, kind: str, name: str = "metrics.jsonl") -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(output / name)
            if r["kind"] == kind]


def rollouts_for(model_dir: Path, task, batching: str, temperature: float):
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    set_trainable(model)
    for p in model.parameters():  # LoRA B off zero, so that the adapter changes the logits
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    data = load_prompt_data(task["train"], tokenizer, max_prompt_len=64)
    rewards = load_reward_functions([f"{task['rewards']}:short"], None)
    options = SamplingOptions(3, 5, temperature, 1.0, 0.1, "grpo", needs_old_logps=True, batching=batching)
    eos = set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids)
    maker = Rollouts(model, tokenizer, ReferencePolicy(model, frozen_initial=False), rewards, options, 1, eos,
                     torch.device("cpu"))
    return model, maker, PromptLoader(data.train, 2, seed=0)


@pytest.mark.parametrize("batching", ["padding-free", "padded"])
def test_token_logps_are_the_log_softmax_of_the_tempered_logits(tiny_model_dir, task, batching):
    model, maker, loader = rollouts_for(tiny_model_dir, task, batching, temperature=0.7)
    rollout = maker.make(loader.batch(0, 0))
    model.train()
    logps = token_logps(model, rollout.batch, rollout.positions, rollout.mask, 0.7)
    logps.sum().backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    expected = torch.zeros_like(logps)
    samples = [s for s in rollout.prompts.samples for _ in range(3)]
    for i, (sample, completion) in enumerate(zip(samples, rollout.completions)):
        ids = torch.tensor([sample.prompt_ids + completion])
        logp = torch.log_softmax(model(ids)[0].float() / 0.7, dim=-1)  # (T, V)
        p = len(sample.prompt_ids)
        for j, token in enumerate(completion):
            expected[i, j] = logp[p + j - 1, token]
    expected.sum().backward()
    assert_close(logps, expected, torch.float32, name="completion token log-probs")
    assert rollout.mask.sum() == sum(rollout.lengths) and (logps[~rollout.mask] == 0).all()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert_close(got_grads[name], param.grad, torch.float32, name=f"d logps / d {name}")
    # π_old (no dropout here) is the policy; π_ref is the base: the adapter moved it away
    assert_close(rollout.old_logps, logps.detach(), torch.float32, name="old log-probs")
    assert not torch.allclose(rollout.ref_logps, logps.detach(), atol=1e-3)


def test_a_run_logs_trl_metrics_every_completion_and_a_reward_curve(tiny_model_dir, task, tmp_path):
    run = grpo.train(grpo_config(tiny_model_dir, task, tmp_path), progress=False)
    train = lines(tmp_path, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    names = {"reward", "reward_std", "frac_reward_zero_std", "rewards/short/mean", "rewards/short/std",
             "rewards/regex/mean", "rewards/regex/std", "kl", "clip_ratio", "clip_ratio/low_mean",
             "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
             "completions/min_length", "completions/max_length", "completions/clipped_ratio"}
    assert names <= train[0].keys()
    completions = lines(tmp_path, "completion", "completions.jsonl")
    assert len(completions) == 4 * 2 * 3  # steps × prompts per step × G
    for step in train:
        mine = [c for c in completions if c["step"] == step["step"]]
        rewards = [c["reward"] for c in mine]
        assert abs(sum(rewards) / len(rewards) - step["reward"]) < 1e-6
        for c in mine:  # total = 1·short + 0.5·regex
            assert abs(c["reward"] - (c["rewards/short"] + 0.5 * c["rewards/regex"])) < 1e-6
        assert step["completions/mean_length"] == sum(c["tokens"] for c in mine) / len(mine)
        assert 0 <= step["kl"] and 0 <= step["clip_ratio"] <= 1
    assert train[0]["kl"] == 0.0  # step 1 samples with the zero-initialised adapter: π = π_ref
    assert any(r["kl"] > 0 for r in train[1:])
    evals = lines(tmp_path, "eval")
    assert [r["step"] for r in evals] == [0, 4] and evals[0]["prompts"] == 2
    assert {"eval/reward", "eval/rewards/short/mean", "eval/completions/mean_length"} <= evals[0].keys()
    assert (tmp_path / "reward.png").is_file() and (tmp_path / "loss.png").is_file()
    metadata = run.adapter_metadata()
    assert metadata["method"] == "grpo" and metadata["grpo"]["rewards"] == ["short", "regex"]


@pytest.mark.parametrize("iterations", [1, 2])
def test_resume_mid_grpo_is_exact(tiny_model_dir, task, tmp_path, iterations):
    """A checkpoint at step 3 (with 2 iterations: between the two steps of one batch of completions)
    resumes to the same losses, metrics, completions and adapter, bit for bit."""
    full_out, part = tmp_path / "full", tmp_path / "part"
    extra = dict(num_iterations=iterations, max_steps=6, lora_dropout=0.1)
    grpo.train(grpo_config(tiny_model_dir, task, full_out, save_every=3, keep_checkpoints=5, **extra), progress=False)
    step3 = full_out / "checkpoints" / "step-000003"
    assert (step3 / "grpo_rollouts.safetensors").is_file() == (iterations == 2)
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(step3, part / "checkpoints" / "step-000003")
    shutil.copy(full_out / "config.json", part / "config.json")
    for name in ("metrics.jsonl", "completions.jsonl"):
        kept = [r for r in read_metrics(full_out / name) if r["step"] <= 3]
        (part / name).write_text("".join(json.dumps(r) + "\n" for r in kept))
    grpo.train(grpo_config(tiny_model_dir, task, part, save_every=3, resume=True, **extra), progress=False)
    assert lines(part, "train") == lines(full_out, "train")
    assert lines(part, "completion", "completions.jsonl") == lines(full_out, "completion", "completions.jsonl")
    if iterations == 2:  # steps 3 and 4 trained on the same completions
        done = lines(full_out, "completion", "completions.jsonl")
        texts = lambda step: [c["completion"] for c in done if c["step"] == step]
        assert texts(3) == texts(4) and texts(4) != texts(5)
    a = load_file(str(full_out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("function", "expected"), [
    ("broken", r"reward broken .*raised ValueError: no sevens.*train\.jsonl:\d"),
    ("none_for_all", r"reward none_for_all .*None.*train\.jsonl:\d"),
    ("too_few", r"reward too_few .*1 value.*"),
])
def test_a_failing_reward_function_stops_before_anything_is_written(tiny_model_dir, task, tmp_path, function,
                                                                      expected):
    cfg = grpo_config(tiny_model_dir, task, tmp_path / "out", reward=[f"{task['rewards']}:{function}"],
                      reward_weights=None, max_completion_len=12, num_generations=6)
    with pytest.raises(RewardError, match=expected):
        grpo.train(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_reward_function_failing_mid_run_leaves_a_checkpoint_to_resume_from(tiny_model_dir, task, tmp_path):
    """Calls: the first rollout before the run begins, the step-0 eval, then two micro-batches per
    step: the fifth call is step 2's second micro-batch, so step 1 was trained and is kept."""
    cfg = grpo_config(tiny_model_dir, task, tmp_path, reward=[f"{task['rewards']}:late"], reward_weights=None)
    with pytest.raises(RewardError, match=r"reward late .*raised KeyError.*stopped at step 1 with a checkpoint in "
                                          r".*step-000001.*continue with --resume"):
        grpo.train(cfg, progress=False)
    assert (tmp_path / "checkpoints" / "step-000001").is_dir() and not (tmp_path / "adapter").exists()


def test_bad_grpo_settings_are_input_errors(tiny_model_dir, task, tmp_path):
    with pytest.raises(InputError, match="--max-len 16 leaves"):
        grpo.train(grpo_config(tiny_model_dir, task, tmp_path / "a", max_len=16, max_completion_len=15),
                   progress=False)
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(task["train"].read_text() + json.dumps({"prompt": "What is 1 + 1?"}) + "\n")
    with pytest.raises(InputError, match=r"no_answer\.jsonl:5: the record has no 'answer' field"):
        grpo.train(grpo_config(tiny_model_dir, task, tmp_path / "b", reward=["number"], reward_weights=None,
                               data=str(no_answer)), progress=False)
    clash = tmp_path / "clash.jsonl"
    clash.write_text(json.dumps({"prompt": "What is 1 + 1?", "completions": ["2"]}) + "\n")
    with pytest.raises(InputError, match=r"clash\.jsonl:1: the field 'completions' has the name"):
        grpo.train(grpo_config(tiny_model_dir, task, tmp_path / "d", data=str(clash)), progress=False)
    with pytest.raises(InputError, match="--pack"):
        grpo.train(grpo_config(tiny_model_dir, task, tmp_path / "c", pack=True), progress=False)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_engine_eval_reward_table_reproduces_the_runs_evaluations(tiny_model_dir, task, tmp_path):
    """``engine.eval --reward``: the base row is the run's step-0 eval, the adapter's its final one
    (greedy completions in the same batches: --batch-size = batch_size × G of the run)."""
    from engine.eval import main as eval_main

    grpo.train(grpo_config(tiny_model_dir, task, tmp_path / "run", max_steps=4, lr=5e-2), progress=False)
    evals = lines(tmp_path / "run", "eval")
    spec = f"{task['rewards']}:short"
    assert eval_main(["--model", str(tiny_model_dir), "--adapter", str(tmp_path / "run" / "adapter"),
                      "--data", str(task["eval"]), "--reward", spec, "regex:[aeiou]", "--reward-weights", "1", "0.5",
                      "--max-completion-len", "6", "--max-len", "96", "--batch-size", "3", "--out",
                      str(tmp_path / "eval"), "--no-progress", "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    base, trained = result["rows"]
    same = lambda a, b: abs(a - b) < 1e-9  # the same completions; sums in another order
    assert same(base["reward"], evals[0]["eval/reward"]) and same(trained["reward"], evals[-1]["eval/reward"])
    assert same(trained["rewards"]["short"], evals[-1]["eval/rewards/short/mean"])
    assert trained["reward"] != base["reward"]
    assert base["prompts"] == 2 and len(trained["completions"]) == 2
    assert "| base |" in (tmp_path / "eval" / "eval.md").read_text()


def test_a_reward_model_scores_the_completions(tiny_model_dir, task, tmp_path):
    """--reward-model: a reward model trained by --method reward is one more weighted reward function."""
    from engine.recipes import reward
    from engine.reward_model import RewardModelScorer

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join((Path(__file__).resolve().parents[3] / "examples" / "license_prefs.jsonl")
                               .read_text().splitlines()[:4]) + "\n")
    reward.train(TrainConfig(method="reward", model=str(tiny_model_dir), data=str(prefs), output=str(tmp_path / "rm"),
                             max_steps=1, batch_size=2, max_len=128, lora_r=4), progress=False)
    grpo.train(grpo_config(tiny_model_dir, task, tmp_path / "run", reward=["regex:[aeiou]"],
                           reward_model=str(tmp_path / "rm" / "adapter"), reward_weights=[1.0, 2.0], max_steps=1),
               progress=False)
    completions = lines(tmp_path / "run", "completion", "completions.jsonl")
    scorer = RewardModelScorer.load(tmp_path / "rm" / "adapter", device="cpu", dtype=torch.float32)
    samples = {s.source: s for s in load_prompt_data(task["train"], load_tokenizer(tiny_model_dir),
                                                     max_prompt_len=90).train}
    prompts = [samples[c["prompt"]].prompt for c in completions]
    expected = scorer(prompts, [[{"role": "assistant", "content": c["completion"]}] for c in completions])
    for c, score in zip(completions, expected):
        assert abs(c["rewards/reward_model"] - score) < 1e-5
        assert abs(c["reward"] - (c["rewards/regex"] + 2.0 * c["rewards/reward_model"])) < 1e-5
    assert "rewards/reward_model/mean" in lines(tmp_path / "run", "train")[0]


@pytest.mark.parametrize("function", ["broken", "none_for_all", "too_few"])
def test_the_command_line_exits_2_with_one_line_naming_the_function(tiny_model_dir, task, tmp_path, capfd, function):
    from tests.faults.conftest import cli

    result = cli("train", "--method", "grpo", "--model", str(tiny_model_dir), "--data", str(task["train"]),
                 "--output", str(tmp_path / "out"), "--reward", f"{task['rewards']}:{function}",
                 "--num-generations", "2", "--max-completion-len", "4", "--max-len", "96", "--lora-r", "2",
                 capfd=capfd)
    assert result.code == 2 and f"reward {function}" in result.message and "train.jsonl:" in result.message
    assert not (tmp_path / "out").exists()
